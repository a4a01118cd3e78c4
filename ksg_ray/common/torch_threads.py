"""Models load on one torch thread (`one_torch_thread`), so that a Ray actor's batches run as fast as in process.

Ray Data builds a map actor on the actor's main thread and runs its batches on another. Every host thread
that runs a multi-threaded torch op gets an OpenMP team of its own, and once libgomp manages more threads than
the process has CPUs it stops spinning at its barriers and puts threads to sleep after a few spins. On this
2-core machine, with the models loaded on 2 threads, every op of every batch paid futex wake-ups: 100,000
voluntary context switches per synthesis batch in the actor against 700 in a plain process, and the batches
ran 20–35% slower than in process (`bench/synthesis.py --answers-of`). Loaded on one thread, the main thread
starts no team, and the batch thread's is the only one, as in a plain process. Loading is mostly reading and
copying weights, so one thread costs it little.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_torch_thread"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Within it torch runs on one thread; the thread count is restored after, also on an error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
