"""The train loop and its config, handed to Ray Train as bytes that only its workers unpickle.

Ray Train's controller actor unpickles `train_loop_per_worker` and `train_loop_config` too, though it never runs
them. Ours hold model tasks (tokenizers, records, peft configs), so the controller imported torch, transformers
and peft before it started a worker: 4-7 s of every Ray Train run here, 5.4 s on average
(`bench/ray_train_start.py`). This module imports nothing heavy, so the controller unpickles one small function
and a `bytes` value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PAYLOAD_KEY", "pack", "run_packed"]

PAYLOAD_KEY = "ksg_payload"


def pack(loop: Callable[[dict], None], loop_config: dict) -> dict[str, bytes]:
    """The `train_loop_config` that makes `run_packed` call `loop(loop_config)` on each worker."""
    from ray import cloudpickle

    return {PAYLOAD_KEY: cloudpickle.dumps((loop, loop_config))}


def run_packed(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: unpickle the real loop and its config here, on the worker, and run it."""
    from ray import cloudpickle

    loop, loop_config = cloudpickle.loads(config[PAYLOAD_KEY])
    loop(loop_config)
