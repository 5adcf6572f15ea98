"""Benchmarks (``lowbit bench ...``). :mod:`lowbit.bench.kernels`: GEMM / conv kernels against torch and peers."""
