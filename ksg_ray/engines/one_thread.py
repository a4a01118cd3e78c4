"""Map actors build their models on one torch thread (`init_on_one_thread`).

Ray Data builds a map actor on the actor's main thread and runs its batches on another. Every host thread
that runs a multi-threaded torch op gets an OpenMP team of its own, and once libgomp manages more threads than
the process has CPUs it stops spinning at its barriers and puts threads to sleep after a few spins. On this
2-core machine, with the models loaded on 2 threads, every op of every batch paid futex wake-ups: 100,000
voluntary context switches per synthesis batch in the actor against 700 in a plain process, and the batches
ran 20–35% slower than in process (`bench/synthesis.py --answers-of`). Built on one thread, the main thread
starts no team, and the batch thread's is the only one, as in a plain process.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import torch

__all__ = ["init_on_one_thread"]

T = TypeVar("T", bound=type)


def init_on_one_thread(cls: T) -> T:
    """Class decorator: the class's `__init__` runs with one torch thread, then the thread count is restored."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            init(self, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    cls.__init__ = __init__
    return cls
