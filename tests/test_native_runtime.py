"""The native runtime around the kernels: thread pool (fork, exceptions, concurrent callers), per-thread ISA cap
and thread-count scoping, binding input checks, the shared epilogue numbering and the accumulator bound."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import _spec as S
import lowbit
from lowbit import kernels
from lowbit.kernels import AccumulatorOverflowError, PackedInt8
from lowbit.kernels.epilogue import EPI_KIND, Requant
from lowbit.kernels.w46 import pack_w46

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("lowbit._native is not built", allow_module_level=True)
from lowbit import _native as C  # noqa: E402

T = C._testing


@pytest.fixture
def two_threads():
    with native.threads(2):
        yield


def _gemm_case(seed: int, m: int = 256, n: int = 96, k: int = 300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    want = S.linear_acc(x.numpy().astype(np.int64) - 7, w.numpy()).astype(np.int32)
    return x, native.pack_int8(w), torch.from_numpy(want)


# ------------------------------------------------------------------------------------------------- fork


def _wait(pid: int, timeout: float) -> int | None:
    """Exit status of child ``pid``, or None (after killing it) if it is still running after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_runs_multithreaded_kernels(two_threads):
    """A forked child (DataLoader worker, multiprocessing) gets a new pool: its multi-threaded GEMM finishes,
    is correct, and really runs on several threads."""
    x, h, want = _gemm_case(1)
    assert torch.equal(native.int8_gemm(x, 7, h), want)  # the parent's pool is up and used
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            ok = torch.equal(native.int8_gemm(x, 7, h), want)
            threads_used = T.parallel_run(8, sleep_us=20000)
            code = 0 if ok and threads_used >= 2 else 2
        finally:
            os._exit(code)
    status = _wait(pid, 60.0)
    assert status is not None, "the forked child hung in a kernel call (thread pool not reset after fork)"
    assert status == 0, f"child exit status {status} (2: wrong result or a single thread)"
    assert torch.equal(native.int8_gemm(x, 7, h), want)  # the parent's pool still works


# ------------------------------------------------------------------------------------------- exceptions


def test_exception_in_a_chunk_is_a_python_error(two_threads):
    """A throw on the calling thread's chunk (item 0) or on a worker's (the last item) is rethrown after every
    chunk finished; the pool and the caller's state survive."""
    for item in (0, 7):
        with pytest.raises(RuntimeError, match=f"forced throw in item {item}"):
            T.parallel_run(8, throw_at=item, sleep_us=2000)
        assert not T.in_parallel_region()  # reset after the throw
    assert T.parallel_run(8, sleep_us=20000) >= 2  # still parallel on this thread
    x, h, want = _gemm_case(2)
    assert torch.equal(native.int8_gemm(x, 7, h), want)


def test_failed_allocation_is_memory_error(two_threads):
    with pytest.raises(MemoryError):
        T.parallel_run(8, alloc_bytes=1 << 62)  # inside the chunks, on every thread
    with pytest.raises(MemoryError):
        C.int8_pack(1, 2**30, 2**30)  # packing buffer of 2^60 bytes: fails before reading the weights
    x, h, want = _gemm_case(3)
    assert torch.equal(native.int8_gemm(x, 7, h), want)


def _idle_cpu_s(wait_s: float) -> float:
    """CPU time this process (all its threads) uses while the calling thread sleeps ``wait_s``."""
    c0 = time.process_time()
    time.sleep(wait_s)
    return time.process_time() - c0


def test_idle_workers_spin_briefly_then_sleep(two_threads):
    """After a parallel_for the idle workers spin at most spin_us() (so a model's next kernel call finds them
    awake), then sleep: an idle pool uses no CPU between models. The positive control shows the
    measurement sees a spinning worker."""
    prev = C.spin_us()
    try:
        C.set_spin_us(2000)
        assert T.parallel_run(8, sleep_us=1000) >= 2
        time.sleep(0.02)  # 10x the spin
        assert _idle_cpu_s(0.2) < 0.02
        C.set_spin_us(100000)  # 100 ms, the cap
        assert T.parallel_run(8, sleep_us=1000) >= 2
        assert _idle_cpu_s(0.08) > 0.005
        C.set_spin_us(10**9)
        assert C.spin_us() == 100000
    finally:
        C.set_spin_us(prev)
    assert prev == native.spin_us()


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_calls_run_at_the_same_time(two_threads):
    """Each call is its own task group: two calls from two Python threads are inside the pool at once (with a
    pool-wide lock the first would wait for the second until its timeout)."""
    T.rendezvous_reset()
    met: list[bool] = []
    ts = [threading.Thread(target=lambda: met.append(T.rendezvous(2, 10000))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert met == [True, True]


def test_concurrent_kernel_calls_are_correct_and_isa_caps_per_thread(two_threads):
    cases = [_gemm_case(10 + i, m=64 + 16 * i) for i in range(4)]
    g = torch.Generator().manual_seed(5)
    xc = torch.randint(0, 256, (2, 16, 9, 9), dtype=torch.uint8, generator=g)
    wc = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8, generator=g)
    pk = PackedInt8(wc)
    want_c = torch.from_numpy(S.conv_acc(xc.numpy().astype(np.int64) - 3, wc.numpy(), None, 1, 1).astype(np.int32))
    errors: list[str] = []
    isas = ["portable", native.int8_isa(), "avx2" if native.best_isa() in ("avx2", "avx512bw", "vnni") else "portable"]

    def work(i: int) -> None:
        x, h, want = cases[i]
        with native.isa(isas[i % len(isas)]):
            expect_isa = native.int8_isa()
            for _ in range(15):
                if native.int8_isa() != expect_isa:
                    errors.append(f"thread {i}: ISA cap changed under it")
                if not torch.equal(native.int8_gemm(x, 7, h), want):
                    errors.append(f"thread {i}: wrong gemm")
                if not torch.equal(native.int8_conv2d(xc, 3, pk, None, None, 1, 1), want_c):
                    errors.append(f"thread {i}: wrong conv")

    before = native.active_isa()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:5]
    assert native.active_isa() == before


def test_isa_and_threads_context_managers_restore():
    best = native.active_isa()
    n0 = native.num_threads()
    with pytest.raises(KeyError):
        with native.isa("portable"), native.threads(3):
            assert native.active_isa() == "portable" and native.num_threads() == 3
            seen: list[str] = []
            t = threading.Thread(target=lambda: seen.append(native.active_isa()))
            t.start()
            t.join()
            assert seen == [best]  # another thread is not capped
            raise KeyError("boom")
    assert native.active_isa() == best and native.num_threads() == n0
    with pytest.raises(ValueError):
        with native.isa("sse9"):
            pass


def test_every_family_follows_the_thread_cap():
    rank = {"portable": 0, "avx2": 2, "avx512bw": 3, "vnni": 4}
    best = native.best_isa()
    for p in [q for q in rank if q == "portable" or (best != "neon" and rank[q] <= rank.get(best, 0))]:
        with native.isa(p):
            assert C.w46_path() == p
            assert C.int8_isa() == {"avx512bw": "avx2"}.get(p, p)  # no AVX-512BW int8 kernel: AVX2 runs
            want = {"portable": {"portable"}, "avx2": {"avx2"}}.get(p, {"avx512bw", "avx512_vpopcntdq"})
            assert C.binary_path() in want


def test_evaluate_restores_thread_counts():
    from lowbit.evaluate import measure_latency

    with native.threads(3):
        torch_before = torch.get_num_threads()
        seen: list[int] = []
        measure_latency({"f": lambda: seen.append(native.num_threads())}, 1, warmup=0, repeats=2, threads=1)
        assert seen == [1, 1]
        assert native.num_threads() == 3 and torch.get_num_threads() == torch_before


# ---------------------------------------------------------------------------------- epilogue, bindings


def test_epilogue_kinds_shared():
    assert C.epilogue_kinds() == EPI_KIND
    assert Requant(torch.ones(1), torch.ones(1), 0, 0, 255).kind == EPI_KIND["requant_u8"]


def _w46_args():
    w = torch.randint(-9, 10, (16, 32), dtype=torch.int8)
    p = C.w46_pack(w.data_ptr(), 16, 32, 14, 9, 1)
    x = torch.randint(0, 29, (4, 32), dtype=torch.uint8)
    out = torch.empty(4, 16, dtype=torch.int32)
    m0 = torch.full((16,), 2**30, dtype=torch.int32)
    rs = torch.full((16,), 20, dtype=torch.int32)
    return w, p, x, out, m0, rs


def test_w46_binding_checks_inputs():
    """Bad arguments to the raw bindings are ValueErrors, never a crash or a silently different result."""
    w, p, x, out, m0, rs = _w46_args()
    xp, op = x.data_ptr(), out.data_ptr()
    u8, s8, f32 = EPI_KIND["requant_u8"], EPI_KIND["requant_s8"], EPI_KIND["float_out"]
    rs70 = torch.full((16,), 70, dtype=torch.int32)  # kept alive: the bindings take raw pointers
    big_bias = torch.full((16,), 2**31 - 10, dtype=torch.int32)
    C.w46_linear(xp, 4, 32, p, 0, u8, m0.data_ptr(), rs.data_ptr(), 0, 0, 255, op)  # valid
    bad = {
        "null activation": (0, 4, 32, p, 0, 0, 0, 0, 0, 0, 0, op),
        "null output": (xp, 4, 32, p, 0, 0, 0, 0, 0, 0, 0, 0),
        "rshift 70": (xp, 4, 32, p, 0, u8, m0.data_ptr(), rs70.data_ptr(), 0, 0, 255, op),
        "null m0": (xp, 4, 32, p, 0, u8, 0, rs.data_ptr(), 0, 0, 255, op),
        "uint8 clamp -5": (xp, 4, 32, p, 0, u8, m0.data_ptr(), rs.data_ptr(), 0, -5, 255, op),
        "int8 clamp 200": (xp, 4, 32, p, 0, s8, m0.data_ptr(), rs.data_ptr(), 0, -128, 200, op),
        "qmin > qmax": (xp, 4, 32, p, 0, u8, m0.data_ptr(), rs.data_ptr(), 0, 9, 8, op),
        "zero point": (xp, 4, 32, p, 0, u8, m0.data_ptr(), rs.data_ptr(), 1 << 30, 0, 255, op),
        "null scale": (xp, 4, 32, p, 0, f32, 0, 0, 0, 0, 0, op),
        "epilogue kind 4": (xp, 4, 32, p, 0, EPI_KIND["bits"], m0.data_ptr(), 0, 0, 0, 0, op),
        "epilogue kind 9": (xp, 4, 32, p, 0, 9, 0, 0, 0, 0, 0, op),
        "row stride": (xp, 4, 31, p, 0, 0, 0, 0, 0, 0, 0, op),
        "bias overflow": (xp, 4, 32, p, big_bias.data_ptr(), 0, 0, 0, 0, 0, 0, op),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError):
            C.w46_linear(*args)
            pytest.fail(what)
    with pytest.raises(ValueError):
        C.w46_pack(0, 16, 32, 14, 9, 1)
    with pytest.raises(ValueError):
        C.w46_conv2d(0, 1, 4, 5, 5, C.w46_pack(w.data_ptr(), 16, 4 * 8, 14, 9, 1), 1, 8, 1, 1, 0, 0, 1, 1, 1, False, 0,
                     0, 0, 0, 0, 0, 0, op)


def test_binary_binding_checks_inputs():
    wd = torch.randint(-(2**62), 2**62, (8, 2), dtype=torch.int64)
    p = C.binary_pack(wd.data_ptr(), 8, 2, 2, 100, 1)
    x = torch.zeros(3, 2, dtype=torch.int64)
    out = torch.zeros(3, 8, dtype=torch.int32)
    C.binary_linear(x.data_ptr(), 3, 2, p, 0, 0, 0, out.data_ptr())
    for args in [(0, 3, 2, p, 0, 0, 0, out.data_ptr()), (x.data_ptr(), 3, 2, p, 0, 0, 0, 0),
                 (x.data_ptr(), 3, 2, p, EPI_KIND["requant_u8"], 1, 1, out.data_ptr()),
                 (x.data_ptr(), 3, 2, p, EPI_KIND["float_out"], 0, 0, out.data_ptr()),
                 (x.data_ptr(), 3, 2, p, EPI_KIND["bits"], 0, 0, out.data_ptr()),
                 (x.data_ptr(), 3, 1, p, 0, 0, 0, out.data_ptr())]:
        with pytest.raises(ValueError):
            C.binary_linear(*args)
    with pytest.raises(ValueError):
        C.binary_pack(0, 8, 2, 2, 100, 1)
    src = torch.ones(2, 10, dtype=torch.uint8)
    dst = torch.zeros(2, 1, dtype=torch.int64)
    C.pack_bits_u8(src.data_ptr(), 2, 10, 10, dst.data_ptr())
    assert dst.tolist() == [[1023], [1023]]
    for args in [(0, 2, 10, 10, dst.data_ptr()), (src.data_ptr(), 2, 10, 10, 0),
                 (src.data_ptr(), 2, 10, 9, dst.data_ptr()), (src.data_ptr(), -1, 10, 10, dst.data_ptr())]:
        with pytest.raises(ValueError):
            C.pack_bits_u8(*args)


def test_int8_binding_checks_clamp_against_output_type():
    h = native.pack_int8(torch.ones(8, 4, dtype=torch.int8))
    x = torch.zeros(2, 4, dtype=torch.uint8)
    ones = torch.ones(8, dtype=torch.int32)
    with pytest.raises(ValueError):  # the dataclass refuses a clamp outside the type...
        Requant(ones * 2**30, ones * 31, 0, -1, 255)
    out = torch.empty(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError):  # ...and so does the binding, for callers that bypass it
        C.int8_gemm(x.data_ptr(), 2, 4, 4, 0, h, 0, EPI_KIND["requant_u8"], out.data_ptr(), ones.data_ptr(),
                    ones.data_ptr(), 0, -3, 255, 0, 0)


# ------------------------------------------------------------------------------------ accumulator bound


def test_accumulator_bound_refused_at_pack_time():
    """K = 70,000 at extreme codes: the exact accumulator (-2.28e9) does not fit int32; every path refuses the
    weights when they are packed instead of wrapping to +2,010,167,296."""
    K = 70_000
    w = torch.full((2, K), -128, dtype=torch.int8)
    exact = -255 * 128 * K
    assert exact < -(2**31) and exact + 2**32 == 2_010_167_296  # what a wrapping kernel would return
    for backend in ("native", "torch"):
        kernels.set_backend(backend)
        try:
            with pytest.raises(AccumulatorOverflowError, match="output channel 0"):
                kernels.pack_int8(w)
        finally:
            kernels.set_backend(None)
    with pytest.raises(ValueError, match="int32 accumulator"):
        C.int8_pack(w.data_ptr(), 2, K)
    ok = kernels.pack_int8(torch.full((2, 60_000), -128, dtype=torch.int8))  # 255*128*60000 < 2^31
    with pytest.raises(AccumulatorOverflowError):  # but not with a bias that tips it over
        kernels.int8_linear(torch.zeros(1, 60_000, dtype=torch.uint8), 0, ok,
                            torch.full((2,), 2**30, dtype=torch.int32))
    w46 = torch.ones(1, 17_000_000, dtype=torch.int8)  # 127 * 1 * 17e6 > 2^31 with K_x = 127
    with pytest.raises(ValueError, match="int32 accumulator"):
        C.w46_pack(w46.data_ptr(), 1, w46.shape[1], 127, 1, 1)
    for backend in ("native", "torch"):
        kernels.set_backend(backend)
        try:
            with pytest.raises(AccumulatorOverflowError, match="output channel 0"):
                pack_w46(w46, 127, 1)
        finally:
            kernels.set_backend(None)


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_accumulator_bound_names_the_layer(method):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(70_000, 2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.where(torch.rand(2, 70_000) > 0.5, 0.5, -0.5))
    with pytest.raises(AccumulatorOverflowError, match="layer '0'.*split the layer"):
        lowbit.quantize(m, method, calib=torch.randn(4, 70_000))


def test_requant_per_tensor_everywhere():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (5, 40), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8, generator=g)
    epi = Requant(torch.tensor([1_500_000_000]), torch.tensor([40]), 9, 0, 255)
    acc = S.linear_acc(x.numpy().astype(np.int64) - 3, w.numpy())
    want = S.requant(acc, 1_500_000_000, 40, 9, 0, 255)
    for backend in ("native", "torch"):
        kernels.set_backend(backend)
        try:
            y = kernels.int8_linear(x, 3, kernels.pack_int8(w), None, epi)
        finally:
            kernels.set_backend(None)
        assert np.array_equal(y.numpy().astype(np.int64), want), backend
    with pytest.raises(ValueError, match="multipliers"):
        native.int8_gemm(x, 3, native.pack_int8(w), None, Requant(torch.ones(3), torch.ones(3), 0, 0, 255))
