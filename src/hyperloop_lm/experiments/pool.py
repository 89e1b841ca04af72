"""Training runs in parallel worker processes, for `reproduce` and `scaling sweep`.

Spawned workers (a fork would copy torch's thread pools), one share of the cores each. When a run reports
that it was interrupted (Ctrl-C or SIGTERM reach every process of the group; each training run saves a
checkpoint and returns), no queued run starts any more and the runs in flight finish their own shutdown.
We never terminate workers mid-run: a worker inside `train` handles SIGTERM itself, so a terminate would wait
for it forever (this hung `reproduce` once). A parent killed on its own (`kill PID`, not the group) would leave
its workers training on, and a restarted suite would then train the same cell twice at once in one directory:
each worker watches its parent and, when it is gone, stops as a SIGTERM would stop it (checkpoint, return).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

_STOP = None  # the suite's stop event, in each worker


def _init(stop, threads: int) -> None:
    global _STOP
    import torch

    _STOP = stop
    torch.set_num_threads(threads)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _stop_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    _STOP.set()  # no queued run starts
    os.kill(os.getpid(), signal.SIGTERM)  # the run in flight saves its checkpoint and returns


def _call(args: tuple[Callable[[Any], Any], Any]) -> Any:
    fn, job = args
    return None if _STOP.is_set() else fn(job)


def run_parallel(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int,
                 interrupted: Callable[[Any], bool]) -> Iterator[Any]:
    """Yield fn(job) for every job as runs finish (any order); `fn` must be a module-level function.
    After the first result for which `interrupted(result)` is true, queued jobs are skipped."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ctx.Pool(workers, initializer=_init, initargs=(stop, threads)) as pool:
        for result in pool.imap_unordered(_call, [(fn, job) for job in jobs]):
            if result is None:  # skipped after an interruption
                continue
            if interrupted(result):
                stop.set()
            yield result
