"""Ray Train plumbing shared by every trainer (DP on the client, plain fine-tuning on the server).

What is the same whatever is trained lives here: moving a batch to the worker's device, gathering ZeRO-3
partitioned parameters where code reads them outside a forward pass, starting DeepSpeed (with the install hint
when the extra is missing), and running a loop on a `TorchTrainer` whose storage makes a rerun resume (Ray
Train V2 restores a run from `storage/name` and hands the loop its latest checkpoint).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ksg_ray.common.sections import ScalingSection
from ksg_ray.common.train_payload import pack, run_packed

__all__ = ["TrainTask", "deepspeed_initialize", "gathered_params", "micro_batch_split", "run_torch_trainer",
           "to_device"]


@dataclass
class TrainTask:
    """What a training run trains, whatever the trainer. Callables must be importable module-level functions
    (Ray pickles them).

    Attributes:
        build_model: (device) -> model whose trainable (`requires_grad`) parameters are the ones to train.
        examples: one entry per record (for DP: the unit of privacy).
        collate: (list of examples) -> dict of tensors.
        loss_fn: (module, batch) -> per-record losses [B].
        save: (model, directory) -> None, writes the trained weights (e.g. the peft adapter).
        load: (model, directory) -> None, restores what `save` wrote (for resume).
        length: (example) -> its token count; None keeps records in sampled order. With it, the trainers put
            records of similar length into one physical micro-batch (`micro_batch_split`), so little is padding.
    """

    build_model: Callable[[torch.device], torch.nn.Module]
    examples: list[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    save: Callable[[torch.nn.Module, Path], None]
    load: Callable[[torch.nn.Module, Path], None]
    length: Callable[[Any], int] | None = field(default=None, kw_only=True)


def micro_batch_split(indices: list[int], size: int, task: TrainTask | None = None) -> list[list[int]]:
    """One step's records (indices into `task.examples`) cut into physical micro-batches of at most `size`,
    longest first, records of similar length together when the task knows lengths.

    A step's update is a sum (DP: of clipped per-record gradients) or a mean over its records, which does not
    depend on how they are split; only the padding does, and at sequence 384 a random split pads about a third.
    """
    order = list(indices)
    if task is not None and task.length is not None:
        order.sort(key=lambda i: task.length(task.examples[i]), reverse=True)
    return [order[j:j + size] for j in range(0, len(order), size)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a collated batch on `device`."""
    return {k: v.to(device) for k, v in batch.items()}


def gathered_params(engine, params: list[torch.nn.Parameter]):
    """ZeRO-3 partitions even the trainable tensors: gather them where code reads them outside forward.

    A collective under ZeRO-3 (every rank must enter it); a no-op context otherwise (`engine` None = no DeepSpeed).
    """
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def deepspeed_initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
                         lr_scheduler: Any = None):
    """`deepspeed.initialize` with a client optimizer; returns (engine, optimizer, lr_scheduler).

    Raises:
        ImportError: the deepspeed extra is not installed.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("strategy=deepspeed needs the deepspeed extra: pip install 'ksg-ray[deepspeed]'") from e
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                              lr_scheduler=lr_scheduler)
    return engine, optimizer, lr_scheduler


def run_torch_trainer(loop: Callable[[dict], None], loop_config: dict, *, scaling: ScalingSection, storage: Path,
                      name: str, max_failures: int, checkpoint_config=None):
    """Run `loop` on `scaling.num_workers` Ray Train workers (gloo on CPU, NCCL on GPU) and return the `Result`;
    with `num_workers: 0`, in this process (Ray Train's local mode, its checkpoints kept by `local_train`).

    Args:
        loop: the `train_loop_per_worker`; it and `loop_config` must be picklable.
        scaling: workers, their CPUs/GPUs and custom resources, and their placement.
        storage, name: the run lives in `storage/name`; a rerun with both unchanged resumes it.
        max_failures: worker failures recovered from (each restart resumes from the latest checkpoint; none in
            local mode, where a rerun resumes).
        checkpoint_config: a `ray.train.CheckpointConfig`; None keeps the 2 latest checkpoints.

    Raises:
        ValueError: local mode with DeepSpeed (one process has no DeepSpeed group to shard over).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    checkpoint_config = checkpoint_config or CheckpointConfig(num_to_keep=2)
    if scaling.num_workers == 0:
        from ksg_ray.common.local_train import local_run_config, run_packed_locally

        if scaling.strategy == "deepspeed":
            raise ValueError("scaling.num_workers=0 runs the loop in this process (Ray Train's local mode), which "
                             "has no DeepSpeed: set scaling.strategy=ddp, or num_workers >= 1")
        trainer = TorchTrainer(
            run_packed_locally,
            train_loop_config=pack(loop, loop_config) | local_run_config(storage / name, checkpoint_config),
            scaling_config=ScalingConfig(num_workers=0, use_gpu=scaling.use_gpu),
            run_config=RunConfig(name=name, storage_path=str(storage)))
        return trainer.fit()

    # Ray Train's controller polls its workers every 2 s by default, and each change of state (workers up, a
    # report, the loop done) waits for the next poll: 3-6 s of every run here (a run that reports once took 14 s,
    # 8-11 s at 0.2). A poll is one small call per worker. Ray Train hands this driver's setting to its controller;
    # a user's own wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = TorchTrainer(
        run_packed,
        train_loop_config=pack(loop, loop_config),  # unpickled on the workers only (`train_payload`)
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker,
                                                           **scaling.resources_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=checkpoint_config),
    )
    return trainer.fit()
