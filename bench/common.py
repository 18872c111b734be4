"""Timing helpers for the benchmarks: medians over repeated runs after a warm-up, CUDA events on the GPU."""
from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import torch

QUICK = os.environ.get("BENCH_QUICK") == "1"  # a short run (CI): fewer shapes and repetitions
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reps(first_ms: float) -> int:
    """Repetitions for a median: fewer for slow calls, so that the full suite stays within minutes."""
    return 3 if QUICK or first_ms > 500 else 5 if first_ms > 50 else 10


def median_ms(fn: Callable[[], object], reps: int | None = None, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on the GPU), after `warmup` calls (the last of which,
    past any compilation, sizes `reps` when it is not given)."""
    first_ms = 1.0
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        sync()
        first_ms = (time.perf_counter() - t) * 1e3
        if i == warmup - 1 and reps is None:
            reps = _reps(first_ms)
    reps = reps or 3
    # on the CPU a sample of a call shorter than a millisecond times enough calls to last about one (a single
    # 20 us call is within the clock's and the scheduler's noise)
    inner = max(1, min(1000, int(1.0 / max(first_ms, 1e-3)))) if DEVICE != "cuda" else 1
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / inner)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated while fn() runs, in MiB, above what was allocated before: on the GPU torch's
    allocator statistics; on the CPU (where torch keeps none) from the profiler's memory events of torch's
    allocator, each allocation counted at the start of the op that makes it and each free at its end (an op's own
    frees are of tensors that outlive its children). Memory allocated outside torch (MKL's buffers) is not seen."""
    if DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
                    for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return round(peak / 2**20, 1)


@functools.cache
def copy_gbps() -> float:
    """The device's copy bandwidth in GB/s, counting bytes read and written (the bound for memory-bound ops)."""
    n = 64 * 2**20
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    ms = median_ms(lambda: dst.copy_(src), reps=5)
    return 2 * n * 4 / ms / 1e6


def run(benchmark, fn: Callable[[], object], baseline: Callable[[], object], **info) -> None:
    """Times fn (through pytest-benchmark) and the torch baseline; puts ms, ratio and `info` into extra_info."""
    base_ms = median_ms(baseline)
    ours_ms = median_ms(fn)

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=min(_reps(ours_ms), 5), warmup_rounds=1)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                ms=round(ours_ms, 4), torch_ms=round(base_ms, 4),
                                speedup=round(base_ms / ours_ms, 3), **info)


def sequence_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, grad: bool) -> Callable[[], None]:
    """A recurrent module's forward over x, without an autograd graph, or with grad its forward and the gradients
    of x and every parameter for the output gradient dy."""
    leaves = [x, *module.parameters()]

    def go() -> None:
        if not grad:
            with torch.no_grad():
                module(x)
            return
        y, _ = module(x)
        torch.autograd.grad(y, leaves, dy)
    return go
