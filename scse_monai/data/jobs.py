"""Run one preparation job per patient or volume, in a process pool when asked; shared by the dataset converters."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

from tqdm.auto import tqdm

__all__ = ["run_patients"]


def run_patients(fn: Callable, jobs: list[tuple], workers: int, desc: str, progress: bool = True) -> list:
    """Runs ``fn(*job)`` for each job, in a process pool if ``workers > 1``; re-raises the first error.

    Args:
        fn: the per-patient function (picklable: a module-level function).
        jobs: one argument tuple per call.
        workers: processes; 1 runs the jobs in this process, in order.
        desc: progress bar label.
        progress: show a progress bar.

    Returns:
        The results, in the order of ``jobs``.

    Example::

        >>> run_patients(pow, [(2, 3), (3, 2)], workers=1, desc="demo", progress=False)
        [8, 9]
    """
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:  # closed (newline) before any error print
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(*job))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                for f in done:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()
            results = [f.result() for f in futures]
    return results
