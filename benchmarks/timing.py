"""Timing and memory helpers shared by the benchmarks.

Times are compared, never taken alone: every candidate runs once per repetition, the candidates interleaved
(the order rotates each repetition), so machine load that comes and goes hits all of them alike; the
median over repetitions is reported, with ratios against a baseline.

Peak memory on CPU: torch has no CPU counterpart of ``torch.cuda.max_memory_allocated`` and ``tracemalloc``
does not see torch's allocator, so the peak is computed from the allocation and free events that
``torch.profiler`` records with ``profile_memory=True``: the maximum, over time, of the bytes allocated by torch
during the call and not yet freed (a prefix-sum maximum). Tensors alive before the call are not counted;
the call's returned value counts until it is dropped.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["compare_times", "peak_memory_bytes", "set_threads"]


def set_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op threads (default: the CPUs this process may use) and returns the number."""
    import os

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def compare_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 1,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float | list[float]]]:
    """Runs every candidate ``repeats`` times, interleaved, and returns the median wall time of each.

    Args:
        candidates: name -> zero-argument callable doing one unit of work.
        repeats: timed runs per candidate.
        warmup: untimed runs per candidate first (allocator, thread pool and kernel selection warm-up).
        setups: name -> zero-argument callable run, untimed, before each run of that candidate (e.g. to restore
            inputs that the candidate overwrites).

    Returns:
        name -> ``{"median_s", "min_s", "cpu_median_s", "times_s", "cpu_times_s"}``: wall-clock median and
        minimum, the median CPU time of the process (all threads; less sensitive to other processes on a shared
        machine, but it counts threads spinning while they wait), and every wall and CPU time, in repetition order.

    Example::

        >>> r = compare_times({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, repeats=3)
        >>> sorted(r)
        ['a', 'b']
    """
    names = list(candidates)
    setups = setups or {}
    for _ in range(warmup):
        for name in names:
            if name in setups:
                setups[name]()
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if name in setups:
                setups[name]()
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "cpu_median_s": statistics.median(cpu[name]),
            "times_s": t,
            "cpu_times_s": cpu[name],
        }
        for name, t in times.items()
    }


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch's CPU allocator while ``fn()`` runs (its result dropped at the end).

    Example::

        >>> x = torch.zeros(1024)
        >>> peak_memory_bytes(lambda: x * 2) >= 4096
        True
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
        gc.collect()
    allocations: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None:
            allocations.append((node.start_time_ns, size))
        stack.extend(node.children)
    allocations.sort()
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak
