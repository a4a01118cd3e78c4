"""DP training on Ray Train: one worker loop for every model trained on private records (generator, reward).

What differs between models lives in a `DPTask` (how to build the model, the per-record examples, the
per-record loss, how to save the result); everything privacy-relevant is shared here: Poisson sampling per
rank, per-record clipping and rank-0 noise (`DPSGD`), `ddp` or `deepspeed` reduction, the accountant history,
and checkpoints that carry that history and the noise generator so a resumed run keeps counting — and replays
the lost step with the same batch and the same noise instead of spending budget on a new draw.

This module runs on the client: it is the only place that sees private examples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ksg_ray.client.privacy.accountant import Mechanism, PrivacyPlanError, epsilon_for
from ksg_ray.client.privacy.dp_sgd import DPSGD, poisson_sample
from ksg_ray.common.ray_train import TrainTask, deepspeed_initialize, micro_batch_split, run_torch_trainer
from ksg_ray.common.ray_train import gathered_params as _full_params
from ksg_ray.common.ray_train import to_device as _to_device
from ksg_ray.common.sections import ScalingSection

logger = logging.getLogger(__name__)

__all__ = ["DPRunSpec", "DPTask", "dp_worker_loop", "fit_dp", "plan_dp_run", "run_identity", "steps_for"]

STATE_FILE = "dp_state.pt"
DS_TAG = "deepspeed"


@dataclass
class DPTask(TrainTask):
    """What one DP training run trains (`TrainTask`'s fields) and its mechanism's `name` in the privacy ledger
    ("generator", "reward")."""

    name: str = ""


@dataclass
class DPRunSpec:
    """The numbers of one DP run, fixed on the driver before any worker starts."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    lr: float
    physical_batch_size: int
    checkpoint_every: int
    strategy: str = "ddp"
    zero_stage: int = 1
    bf16: bool = False
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    sampling_seed: int = 0
    noise_seed: int | None = None
    accountant: str = "prv"
    probe_records: int = 16
    prior_history: list[tuple[float, float, int]] = field(default_factory=list)
    run_id: str = ""  # the run's ledger key (`run_identity`); its checkpoints carry it
    resume: bool = False  # the driver found a checkpoint of this run: training must restore it

    num_records: int = 0

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_records


def _max_over_ranks(value: int, world: int) -> int:
    t = torch.tensor([value])
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _deepspeed_config(spec: DPRunSpec, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches are Poisson-sized; the engine only sees the surrogate
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": 0.0,  # clipping is per record, done before the engine sees anything
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": False},  # bf16 enters as autocast in forward; no loss scaling, which breaks DP
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def dp_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: `config` = {"task": DPTask, "spec": DPRunSpec}."""
    import ray.train
    import ray.train.torch

    from ksg_ray.common.lora import frozen_linears_to_bf16

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    task: DPTask = config["task"]
    spec: DPRunSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model = task.build_model(device)
    if spec.bf16 and spec.strategy != "deepspeed":  # runs under autocast (below): the frozen base needs no casts
        frozen_linears_to_bf16(model)  # (ZeRO-3 partitions frozen weights too, so DeepSpeed keeps them as built)

    dp = DPSGD(model, max_grad_norm=spec.max_grad_norm, noise_multiplier=spec.noise_multiplier,
               expected_batch_size=spec.expected_batch_size, rank=rank, world_size=world, noise_seed=spec.noise_seed)
    if spec.optimizer == "sgd":  # plain DP-SGD: the update is the noised gradient itself
        optimizer = torch.optim.SGD(dp.params, lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(dp.params, lr=spec.lr, weight_decay=spec.weight_decay)
    engine = None
    if spec.strategy == "deepspeed":
        engine, optimizer, _ = deepspeed_initialize(dp.module, optimizer, _deepspeed_config(spec, world))

    state: dict[str, Any] = {"step": 0, "losses": [], "sampling_seed": spec.sampling_seed, "run_id": spec.run_id}
    checkpoint = ray.train.get_checkpoint()
    if spec.resume and not checkpoint:  # step 0 under the old run's id would replace its ledger entry
        raise RuntimeError(f"run {spec.run_id} was to resume from its checkpoint, but Ray Train restored none: "
                           "delete its run directory to start afresh (a fresh run gets a new run id)")
    if checkpoint:
        with checkpoint.as_directory() as tmp:
            d = Path(tmp)
            state = torch.load(d / STATE_FILE, weights_only=False)
            if state.get("run_id", spec.run_id) != spec.run_id:  # older checkpoints carry no run id
                raise RuntimeError(f"the checkpoint belongs to run {state['run_id']}, not {spec.run_id}: "
                                   "delete its run directory to start afresh")
            if engine is not None:  # restores the trainable weights and this rank's optimizer shard
                engine.load_checkpoint(str(d / "deepspeed"), tag=DS_TAG, load_module_strict=False)
            else:
                task.load(model, d / "model")
                optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=False))
            if rank == 0:
                dp.load_state_dict(state["dp"])
        logger.info("rank %d resumes at step %d", rank, state["step"])

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16)
    probe = _to_device(task.collate(task.examples[: spec.probe_records]), device)
    if state["step"] == 0:
        state["probe_loss_start"] = _probe_loss(dp, task, probe, autocast)
    for step in range(state["step"], spec.steps):
        idx = poisson_sample(spec.num_records, spec.sample_rate, state["sampling_seed"], step, rank, world)
        chunks = micro_batch_split(idx, spec.physical_batch_size, task)
        # Under ZeRO-3 every forward is a collective: agree on the pass count before the first one.
        lockstep = engine is not None and engine.zero_optimization_stage() == 3
        passes = _max_over_ranks(len(chunks), world) if lockstep else len(chunks)
        with autocast:
            sums, loss_sum, count = dp.clipped_sum(
                (_to_device(task.collate([task.examples[i] for i in c]), device) for c in chunks), task.loss_fn)
            for _ in range(passes - len(chunks)):
                dp.lockstep_pass(_to_device(task.collate(task.examples[:1]), device), task.loss_fn)
        noised = dp.noised_sum(sums)
        if engine is not None:
            with _full_params(engine, dp.params):
                engine.backward(dp.surrogate_loss(noised, world))
            engine.step()
        else:
            dp.all_reduce_grads(noised)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        stats = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        state["step"] = step + 1
        state["losses"].append(mean_loss)
        metrics = _step_metrics(spec, task.name, state["step"], mean_loss, int(stats[1]), rank)
        if state["step"] == spec.steps:
            state["probe_loss_end"] = _probe_loss(dp, task, probe, autocast)
            metrics |= {k: state[k] for k in ("probe_loss_start", "probe_loss_end")}
        if state["step"] % spec.checkpoint_every == 0 or state["step"] == spec.steps:
            _report_with_checkpoint(metrics, state, task, model, dp, optimizer, engine, rank)
        else:
            ray.train.report(metrics)


@torch.no_grad()
def _probe_loss(dp: DPSGD, task: DPTask, probe: dict[str, torch.Tensor], autocast) -> float:
    """Mean loss on a fixed set of records: per-batch losses move with the Poisson batch, this one only with the
    model. Every rank computes it (a ZeRO-3 forward is a collective); it stays on the client, like all metrics."""
    dp.module.eval()
    with autocast:
        loss = float(task.loss_fn(dp.module, probe).mean())
    dp.module.train()
    return loss


def _step_metrics(spec: DPRunSpec, name: str, step: int, loss: float, batch: int, rank: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {"step": step, "loss": loss, "batch_size": batch,
                               "noise_multiplier": spec.noise_multiplier, "sample_rate": spec.sample_rate}
    if rank == 0:  # ε of everything spent on these records so far: earlier mechanisms + this run's steps
        history = spec.prior_history + Mechanism(name, spec.noise_multiplier, spec.sample_rate, step).history()
        metrics["epsilon"] = epsilon_for(history, spec.delta, spec.accountant)
    return metrics


def _report_with_checkpoint(metrics, state, task, model, dp, optimizer, engine, rank) -> None:
    """Every rank reports a checkpoint (Ray merges the directories); file names never collide across ranks."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if engine is not None:  # DeepSpeed writes its own per-rank optimizer shards
            engine.save_checkpoint(str(d / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        with _full_params(engine, dp.params):  # a collective under ZeRO-3: every rank enters it
            if rank == 0:
                task.save(model, d / "model")
        if rank == 0:
            if engine is None:
                torch.save(optimizer.state_dict(), d / "optimizer.pt")
            torch.save(state | {"dp": dp.state_dict()}, d / STATE_FILE)
            progress = {k: v for k, v in state.items() if k not in ("dp", "sampling_seed")}  # no secrets
            (d / "progress.json").write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state['step']:07d}")


def fit_dp(task: DPTask, spec: DPRunSpec, *, scaling: ScalingSection, output_dir: Path, name: str,
           max_failures: int) -> tuple[Path, dict[str, Any]]:
    """Run `dp_worker_loop` on a Ray Train `TorchTrainer`; returns (final checkpoint dir, last metrics).

    A rerun with the same `output_dir`/`name` resumes from the run's latest checkpoint (Ray Train V2 restores
    the run from its storage), so a job that died redoes no finished step. The run's numbers are written
    beside it and a rerun with different numbers is refused: resuming under another σ or q would make the
    checkpoint's accountant history wrong. `spec.run_id` is written there too (a resume reads it back).
    """
    storage = Path(os.path.abspath(output_dir))
    run_dir = storage / name
    run_dir.mkdir(parents=True, exist_ok=True)
    numbers = {k: v for k, v in asdict(spec).items()
               if k not in ("noise_seed", "sampling_seed", "prior_history", "resume")}
    numbers["mechanism"] = task.name  # a reward run must never resume a generator's checkpoint
    numbers_file = run_dir / "dp_run.json"
    if numbers_file.exists():
        before = json.loads(numbers_file.read_text())
        changed = {k: (before.get(k), v) for k, v in numbers.items() if before.get(k) != v and k != "run_id"}
        if changed:
            raise PrivacyPlanError(
                f"{run_dir} holds a run with other DP numbers {changed} (before, now): resuming it would break the "
                "accounting. Use another run.name or delete that directory."
            )
    numbers_file.write_text(json.dumps(numbers | {"run_id": spec.run_id or task.name}, indent=2))

    result = run_torch_trainer(dp_worker_loop, {"task": task, "spec": spec}, scaling=scaling, storage=storage,
                               name=name, max_failures=max_failures)
    if result.checkpoint is None:
        raise RuntimeError(f"DP training {name} finished without a checkpoint: {result.error}")
    return Path(result.checkpoint.path), dict(result.metrics or {})


def run_identity(run_dir: Path, name: str) -> tuple[str, bool]:
    """(run id, resume). A run in `run_dir` with a checkpoint to resume from keeps the id in its `dp_run.json`;
    any run from step 0 gets a fresh `<name>:<nonce>`, even in a directory whose checkpoints were deleted, so
    it is a new ledger entry and never replaces an old run's."""
    run_dir = Path(run_dir)
    numbers_file = run_dir / "dp_run.json"
    if numbers_file.exists() and any(run_dir.glob(f"checkpoint_*/{STATE_FILE}")):
        return json.loads(numbers_file.read_text()).get("run_id", name), True  # older runs: keyed by name
    return f"{name}:{secrets.token_hex(6)}", False


def steps_for(epochs: float, sample_rate: float, max_steps: int | None) -> int:
    """Poisson sampling sees each record `q` of the time per step, so an epoch is 1/q steps."""
    steps = max(1, math.ceil(epochs / sample_rate))
    return min(steps, max_steps) if max_steps else steps


def plan_dp_run(num_records: int, privacy, train, scaling, *, run_id: str = "", resume: bool = False,
                prior_history: list[tuple[float, float, int]] | None = None) -> DPRunSpec:
    """Fix a run's numbers before anything trains: q, steps, σ for the whole run, δ < 1/N. The budget is the
    ledger's business (`PrivacyEngine`).

    Args:
        privacy, train, scaling: the job's config sections (`ksg_ray.client.config`).
        run_id, resume: this run's ledger key and whether it resumes (`run_identity`).
        prior_history: what the runs it composes with spent (the ε metric of each step).

    Raises:
        ValueError: δ ≥ 1/N or ε unreachable.
    """
    from ksg_ray.client.privacy.accountant import calibrate_noise
    from ksg_ray.client.privacy.ledger import check_delta

    check_delta(privacy.delta, num_records)
    q = min(1.0, train.expected_batch_size / num_records)
    steps = steps_for(train.epochs, q, train.max_steps)
    sigma = calibrate_noise(privacy.target_epsilon, privacy.delta, q, steps, privacy.accountant,
                            prior_history if privacy.target_scope == "total" else None)
    return DPRunSpec(
        steps=steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm, delta=privacy.delta,
        lr=train.lr, physical_batch_size=train.physical_batch_size, checkpoint_every=train.checkpoint_every,
        probe_records=train.probe_records, strategy=scaling.strategy, zero_stage=scaling.zero_stage,
        bf16=scaling.use_bf16, weight_decay=train.weight_decay, optimizer=train.optimizer, num_records=num_records,
        accountant=privacy.accountant, noise_seed=privacy.noise_seed,
        prior_history=list(prior_history or []), run_id=run_id, resume=resume,
        sampling_seed=privacy.sampling_seed if privacy.sampling_seed is not None else secrets.randbits(63),
    )
