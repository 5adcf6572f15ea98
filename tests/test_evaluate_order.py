"""lowbit.evaluate.measure_latency interleaves its candidates fairly: no candidate always runs right after
the same one (the one after a slow, cache-evicting candidate would pay for it in every round)."""

from __future__ import annotations

from collections import Counter

from lowbit.evaluate import measure_latency


def test_every_candidate_follows_every_other():
    calls: list[str] = []
    runs = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    out = measure_latency(runs, 1, warmup=1, repeats=200, threads=1)
    assert set(out) == set("abcd") and all(v.repeats == 200 for v in out.values())
    timed = calls[4:]  # after one warm-up round
    assert Counter(timed) == {k: 200 for k in "abcd"}
    pairs = Counter(zip(timed, timed[1:], strict=False))
    for a in "abcd":
        for b in "abcd":
            if a != b:  # 800 calls, 12 ordered pairs: ~66 each in a fair order; a fixed order gives 0 or ~200
                assert 30 <= pairs[a, b] <= 110, (a, b, pairs[a, b])
