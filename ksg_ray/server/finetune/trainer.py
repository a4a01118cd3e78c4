"""SERVER SIDE — fine-tuning of the target model on Ray Train (no DP: it only sees outputs of DP models).

One worker loop for `ddp` and `deepspeed` (ZeRO 1–3). Each optimizer step takes `batch_size` records of a
per-epoch seeded permutation; every rank works through the same number of micro-batches (`accum`), padding with
zero-weight passes where its share runs short, so DDP's reducer and DeepSpeed's accumulation counter (and ZeRO-3's
collective forwards) stay in lockstep. The loss is the per-record mean over answer tokens
(`ksg_ray.common.lora.lm_loss`: prompt tokens are labelled -100), averaged over the step's records.

After every epoch the dev set is answered greedily (shared out over the ranks, ROUGE-L summed with one
all-reduce), the answer-token loss of a fixed probe of training records is measured (it moves with the model
only, unlike batch losses), and a checkpoint is reported with the score; Ray keeps the best-scoring checkpoint
and the latest one (`CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY)`). Mid-epoch
checkpoints, every `checkpoint_every` steps, score -1 (below any ROUGE-L) and exist only to resume. With no dev
set (`finetune_data.NO_DEV`, or `DEV_OFF`: `dev.limit=0`) an epoch scores its number, so the last epoch is kept
and exported. A checkpoint holds the trainable weights in export form (`model/`: a peft adapter, or full HF
weights), the optimizer (`optimizer.pt`, or DeepSpeed's own shards under `deepspeed/`) and `finetune_state.json`
(position, losses, scores, best epoch), so a killed run resumes at the step after its last checkpoint with the
same data order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ksg_ray.common.ray_train import (
    TrainTask,
    deepspeed_initialize,
    gathered_params,
    micro_batch_split,
    run_torch_trainer,
    to_device,
)
from ksg_ray.common.sections import ScalingSection
from ksg_ray.server.finetune.data import format_dev_score

logger = logging.getLogger(__name__)

__all__ = ["SCORE_KEY", "STATE_FILE", "FinetuneSpec", "FinetuneTask", "best_epoch", "build_finetune_model",
           "check_run_identity", "dev_rouge_l", "finetune_worker_loop", "fit_finetune", "greedy_answers", "load_full",
           "micro_batches", "plan_finetune", "save_full"]

STATE_FILE = "finetune_state.json"
SCORE_KEY = "select_score"  # dev ROUGE-L at epoch ends, MID_EPOCH_SCORE elsewhere; Ray keeps the best by it
MID_EPOCH_SCORE = -1.0
DS_TAG = "deepspeed"


@dataclass
class FinetuneTask(TrainTask):
    """What is trained (`TrainTask`'s fields) and how it is judged.

    Attributes:
        tokenizer_path: the tokenizer of the dev generations.
        dev_prompts: chat prompts of the dev records.
        dev_references: their reference answers.
        full_weights: `save` reads every weight (full fine-tune), so ZeRO-3 must gather them all, not only the
            trainable ones.
    """

    tokenizer_path: str = ""
    dev_prompts: list[list[dict]] = field(default_factory=list)
    dev_references: list[str] = field(default_factory=list)
    full_weights: bool = False


@dataclass
class FinetuneSpec:
    """The numbers of one run, fixed on the driver before any worker starts (and checked on resume)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    micro_batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    checkpoint_every: int = 50
    strategy: str = "ddp"
    zero_stage: int = 1
    bf16: bool = False
    seed: int = 0
    dev_max_new_tokens: int = 64
    dev_batch_size: int = 8
    probe_records: int = 16


def micro_batches(batch: list[int], rank: int, world: int, micro: int, accum: int,
                  task: TrainTask | None = None) -> list[list[int]]:
    """This rank's share of one step's records (every `world`-th), cut into exactly `accum` micro-batches
    (by length when `task` knows lengths: `micro_batch_split`); an empty list is a zero-weight pass that keeps
    the ranks in lockstep."""
    mine = batch[rank::world]
    chunks = micro_batch_split(mine, micro, task)
    return chunks + [[] for _ in range(accum - len(chunks))]


def best_epoch(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch record with the highest `dev_rouge_l`; ties go to the later epoch, as Ray's checkpoint retention
    breaks them (so the checkpoint of the chosen epoch is the one Ray keeps). Without a dev set (scores None)
    the last epoch."""
    if any(e["dev_rouge_l"] is None for e in epochs):
        return epochs[-1]
    return max(reversed(epochs), key=lambda e: e["dev_rouge_l"])


def _lr_lambda(spec: FinetuneSpec):
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.lr_schedule == "cosine":
            done = (step - spec.warmup_steps) / max(1, spec.total_steps - spec.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0
    return factor


def _deepspeed_config(spec: FinetuneSpec, world: int, accum: int) -> dict:
    """As in Ray Train's DeepSpeed example: ZeRO stage, bf16 (master weights stay fp32 in the optimizer),
    clipping by the engine; the client's torch optimizer is used so the same config runs on CPU (gloo)."""
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage >= 2:
        zero |= {"overlap_comm": True, "contiguous_gradients": True}
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": spec.micro_batch_size * accum * world,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def finetune_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: `config` = {"task": FinetuneTask, "spec": FinetuneSpec}."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from ksg_ray.common.lora import frozen_linears_to_bf16

    task: FinetuneTask = config["task"]
    spec: FinetuneSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    accum = math.ceil(spec.batch_size / (world * spec.micro_batch_size))
    model = task.build_model(device)
    if spec.bf16 and spec.strategy != "deepspeed":  # runs under autocast (below): the frozen base needs no casts
        frozen_linears_to_bf16(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec))
    engine, train_module = None, model
    if spec.strategy == "deepspeed":
        engine, optimizer, scheduler = deepspeed_initialize(model, optimizer, _deepspeed_config(spec, world, accum),
                                                            scheduler)
        train_module = engine
    elif world > 1:
        train_module = ray.train.torch.prepare_model(model, move_to_device=False)

    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "losses": [], "epochs": [],
                             "dev_rouge_l_start": None, "probe_loss_start": None, "best": None, "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as tmp:
            d = Path(tmp)
            state = json.loads((d / STATE_FILE).read_text())
            if engine is not None:  # restores the trainable weights, this rank's optimizer shard, the schedule
                engine.load_checkpoint(str(d / "deepspeed"), tag=DS_TAG, load_module_strict=False)
            else:
                task.load(model, d / "model")
                opt_state = torch.load(d / "optimizer.pt", weights_only=False)
                optimizer.load_state_dict(opt_state["optimizer"])
                scheduler.load_state_dict(opt_state["scheduler"])
        if rank == 0:
            logger.info("resuming at epoch %d, step %d", state["epoch"] + 1, state["step_in_epoch"])
    state["starts"].append(state["global_step"])  # where each attempt began: [0] unless a failure was recovered

    tokenizer = AutoTokenizer.from_pretrained(task.tokenizer_path)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16 and engine is None)
    synced = engine is not None and engine.zero_optimization_stage() == 3 and world > 1

    def evaluate() -> tuple[float | None, list[str]]:
        if not task.dev_prompts:
            return None, []
        with autocast:
            return dev_rouge_l(model, tokenizer, task.dev_prompts, task.dev_references, rank=rank, world=world,
                               max_new_tokens=spec.dev_max_new_tokens, batch_size=spec.dev_batch_size,
                               synced_gpus=synced)

    probe = to_device(task.collate(task.examples[:spec.probe_records]), device)

    def probe_loss() -> float:
        """Mean answer-token loss on a fixed set of training records: moves with the model only (every rank
        computes it: a ZeRO-3 forward is a collective)."""
        model.eval()
        with torch.no_grad(), autocast:
            loss = float(task.loss_fn(model, probe).mean())
        model.train()
        return loss

    if state["dev_rouge_l_start"] is None:
        state["probe_loss_start"] = probe_loss()
        state["dev_rouge_l_start"], _ = evaluate()
        ray.train.report(_known({"epoch": 0, "dev_rouge_l": state["dev_rouge_l_start"],
                                 "probe_loss": state["probe_loss_start"]}))

    n = len(task.examples)
    for epoch in range(state["epoch"], spec.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 100_003 + epoch)).tolist()
        last_step = min(spec.steps_per_epoch, spec.total_steps - epoch * spec.steps_per_epoch)
        for step in range(state["step_in_epoch"], last_step):
            batch = order[step * spec.batch_size:(step + 1) * spec.batch_size]
            loss = _train_step(task, spec, batch, rank, world, accum, train_module, engine, optimizer, scheduler,
                               params, autocast, device)
            state["step_in_epoch"], state["global_step"] = step + 1, state["global_step"] + 1
            state["losses"].append(loss)
            metrics = {"epoch": epoch + 1, "step": state["global_step"], "loss": loss}
            if step + 1 < last_step and state["global_step"] % spec.checkpoint_every == 0:
                _report_checkpoint(metrics | {SCORE_KEY: MID_EPOCH_SCORE}, state, task, model, optimizer, scheduler,
                                   engine, rank)
            else:
                ray.train.report(metrics)

        score, samples = evaluate()
        epoch_losses = state["losses"][-last_step:]
        name = f"checkpoint_epoch{epoch + 1:03d}_step{state['global_step']:07d}"
        record = {"epoch": epoch + 1, "step": state["global_step"], "dev_rouge_l": score,
                  "train_loss": sum(epoch_losses) / len(epoch_losses), "probe_loss": probe_loss(),
                  "checkpoint": name, "dev_samples": samples[:2]}
        state["epochs"].append(record)
        state["best"] = {k: v for k, v in best_epoch(state["epochs"]).items() if k != "dev_samples"}
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if rank == 0:
            logger.info("epoch %d/%d: train loss %.4f, probe loss %.4f, dev ROUGE-L %s%s", epoch + 1, spec.epochs,
                        record["train_loss"], record["probe_loss"], format_dev_score(score),
                        " (best)" if state["best"]["epoch"] == epoch + 1 else "")
        # Without a dev set the epoch number is the score, so Ray keeps the last epoch's checkpoint.
        _report_checkpoint({"epoch": epoch + 1, "step": state["global_step"], "train_loss": record["train_loss"],
                            "probe_loss": record["probe_loss"], "dev_rouge_l": score,
                            SCORE_KEY: float(epoch + 1) if score is None else score}, state, task,
                           model, optimizer, scheduler, engine, rank, name)
        if state["global_step"] >= spec.total_steps:
            break


def _train_step(task, spec, batch, rank, world, accum, train_module, engine, optimizer, scheduler, params,
                autocast, device) -> float:
    """One optimizer step over `batch` (global record indices); returns the step's mean per-record loss.

    Each pass's loss is scaled so the reduced gradient is the mean over the step's records: DDP averages over
    ranks, DeepSpeed also divides by `accum`, and the records per step may be fewer than `batch_size` (epoch end).
    """
    train_module.train()
    scale = world * (accum if engine is not None else 1) / len(batch)
    local_sum = 0.0
    for k, idx in enumerate(micro_batches(batch, rank, world, spec.micro_batch_size, accum, task)):
        inputs = to_device(task.collate([task.examples[i] for i in (idx or [0])]), device)
        defer_sync = isinstance(train_module, torch.nn.parallel.DistributedDataParallel) and k < accum - 1
        with train_module.no_sync() if defer_sync else contextlib.nullcontext(), autocast:
            per_record = task.loss_fn(train_module, inputs)
            summed = per_record.sum() if idx else per_record.sum() * 0.0
            if engine is not None:
                engine.backward(summed * scale)
                engine.step()  # a no-op except at the accumulation boundary (the last pass)
            else:
                (summed * scale).backward()
        local_sum += float(summed.detach())
    if engine is None:
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    total = torch.tensor([local_sum], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0]) / len(batch)


def _known(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics Ray can record: a run without a dev set has no ROUGE-L (None)."""
    return {k: v for k, v in metrics.items() if v is not None}


def _report_checkpoint(metrics, state, task, model, optimizer, scheduler, engine, rank, name=None) -> None:
    """Every rank reports a checkpoint (Ray merges the directories); file names never collide across ranks."""
    import ray.train

    name = name or f"checkpoint_step{state['global_step']:07d}"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if engine is not None:  # DeepSpeed writes its own per-rank optimizer shards
            engine.save_checkpoint(str(d / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        saved = [p for p in model.parameters() if task.full_weights or p.requires_grad]
        with gathered_params(engine, saved):  # a collective under ZeRO-3: every rank enters it
            if rank == 0:
                task.save(model, d / "model")
        if rank == 0:
            if engine is None:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           d / "optimizer.pt")
            (d / STATE_FILE).write_text(json.dumps(state, indent=1))
        ray.train.report(_known(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int,
                   synced_gpus: bool = False) -> list[str]:
    """Greedy answers of an in-memory model to chat prompts (left-padded batch, cut at the first end of turn)."""
    from ksg_ray.engines import render_prompt

    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id}
                     - {None})
    device = next(model.parameters()).device
    enc = tokenizer([render_prompt(tokenizer, p) for p in prompts], padding=True, add_special_tokens=False,
                    return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
                         top_k=50, repetition_penalty=1.0, pad_token_id=pad_id, eos_token_id=eos_ids, use_cache=True,
                         synced_gpus=synced_gpus)
    model.train(was_training)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def dev_rouge_l(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict]], references: list[str], *,
                rank: int = 0, world: int = 1, max_new_tokens: int = 64, batch_size: int = 8,
                synced_gpus: bool = False) -> tuple[float, list[str]]:
    """Mean ROUGE-L F1 of greedy answers against the references, the prompts shared out over the ranks.

    Every rank makes the same number of `generate` calls (a short share is padded with a repeated prompt whose
    answer is dropped), as ZeRO-3's collective forwards require. The calls take the prompts longest first, so
    a long one pads batch-mates of like length. Returns (score, this rank's answers, in its prompts' order).
    """
    from ksg_ray.common.text_metrics import rouge_l
    from ksg_ray.engines import prompt_ids

    mine = list(range(rank, len(prompts), world))
    longest_first = sorted(mine, key=lambda i: -len(prompt_ids(tokenizer, prompts[i])))
    calls = math.ceil(math.ceil(len(prompts) / world) / batch_size)
    total, answers = 0.0, {}
    for c in range(calls):
        idx = longest_first[c * batch_size:(c + 1) * batch_size]
        got = greedy_answers(model, tokenizer, [prompts[i] for i in idx] or prompts[:1], max_new_tokens, synced_gpus)
        for i, answer in zip(idx, got, strict=False):
            total += rouge_l(answer, references[i])
            answers[i] = answer
    summed = torch.tensor([total], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(summed)
    return float(summed[0]) / len(prompts), [answers[i] for i in mine]


def build_finetune_model(device: torch.device, *, model_path: str, mode: str, lora, seed: int = 0,
                         init_kind: str = "base", init_path: str | None = None, dtype: str = "float32",
                         gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The model to fine-tune, on `device`.

    Args:
        model_path: the public base (local folder or hub id).
        mode: "lora" (adapters on a frozen base) or "full" (every weight but the input embeddings, as RewardDS).
        lora: a `LoraSection`, for a new adapter.
        init_kind: "base" (start from `model_path`), "adapter" (continue the peft adapter at `init_path`, trainable;
            merged into the base for mode=full) or "merged" (full weights at `init_path`).
        dtype: weight dtype of a full fine-tune ("bfloat16" halves the memory of the load; DeepSpeed's bf16
            optimizer keeps fp32 master weights). LoRA bases load in float32.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ksg_ray.common.lora import build_lora_lm

    src = init_path if init_kind == "merged" else model_path
    if mode == "lora" and init_kind != "adapter":
        model = build_lora_lm(device, model_path=src, lora=lora, seed=seed)
    else:
        weights = torch.float32 if mode == "lora" else getattr(torch, dtype)
        base = AutoModelForCausalLM.from_pretrained(src, dtype=weights)
        base.config.use_cache = False
        base.to(device)  # before peft (opacus#820 is a DP issue, but the order costs nothing)
        model = base
        if init_kind == "adapter":
            model = PeftModel.from_pretrained(base, init_path, is_trainable=mode == "lora")
            if mode == "full":
                model = model.merge_and_unload()
                model.requires_grad_(True)
        if mode == "full":
            model.get_input_embeddings().requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def save_full(model: torch.nn.Module, out: Path) -> None:
    """Full weights as a plain Hugging Face folder (config.json + safetensors)."""
    model.save_pretrained(str(out), safe_serialization=True)


def load_full(model: torch.nn.Module, src: Path) -> None:
    """Restore `save_full` weights in place (tied weights are stored once and re-tied by the model)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        state |= load_file(str(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{src}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def fit_finetune(task: FinetuneTask, spec: FinetuneSpec, *, scaling: ScalingSection, storage: Path, name: str,
                 max_failures: int) -> tuple[Path, dict[str, Any]]:
    """Run `finetune_worker_loop` on a `TorchTrainer`; returns (the best epoch's checkpoint dir, final state).

    A rerun with the same `storage`/`name` resumes from the run's latest checkpoint (Ray Train V2 restores the
    run), so a job that died redoes no finished step; a finished run trains nothing more.

    Raises:
        RuntimeError: the run ended without an epoch checkpoint.
    """
    from ray.train import CheckpointConfig

    start = time.time()
    result = run_torch_trainer(
        finetune_worker_loop, {"task": task, "spec": spec}, scaling=scaling, storage=storage, name=name,
        max_failures=max_failures,
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY,
                                           checkpoint_score_order="max"))
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning {name} finished without a checkpoint: {result.error}")
    state = json.loads((Path(result.checkpoint.path) / STATE_FILE).read_text())
    if not state.get("best"):
        raise RuntimeError(f"fine-tuning {name} finished no epoch: {result.error}")
    best = Path(result.checkpoint.path).parent / state["best"]["checkpoint"]
    if not (best / "model").is_dir():
        raise RuntimeError(f"the best epoch's checkpoint {best} is gone (Ray keeps it by {SCORE_KEY})")
    logger.info("fine-tuning %s: %d steps, best epoch %d (dev ROUGE-L %s), %.1fs", name, state["global_step"],
                state["best"]["epoch"], format_dev_score(state["best"]["dev_rouge_l"]), time.time() - start)
    return best, state


def plan_finetune(train, scaling, dev, num_records: int) -> FinetuneSpec:
    """Fix a run's numbers from its config sections (`FinetuneTrainSection`, `ScalingSection`, `DevSection`):
    steps per epoch = ceil(N / batch), capped in total by `train.max_steps`."""
    steps_per_epoch = math.ceil(num_records / train.expected_batch_size)
    total = int(train.epochs) * steps_per_epoch
    total = min(total, train.max_steps) if train.max_steps else total
    return FinetuneSpec(
        epochs=int(train.epochs), steps_per_epoch=steps_per_epoch, total_steps=total,
        batch_size=min(train.expected_batch_size, num_records), micro_batch_size=train.physical_batch_size,
        lr=train.lr, weight_decay=train.weight_decay, optimizer=train.optimizer, max_grad_norm=train.max_grad_norm,
        warmup_steps=round(train.warmup_ratio * total), lr_schedule=train.lr_schedule,
        checkpoint_every=train.checkpoint_every, strategy=scaling.strategy, zero_stage=scaling.zero_stage,
        bf16=scaling.use_bf16, seed=train.seed, dev_max_new_tokens=dev.max_new_tokens, dev_batch_size=dev.batch_size,
        probe_records=train.probe_records)


def check_run_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a run under other settings or data: its checkpoints (data order, schedule, weights)
    belong to the run that wrote them. The first run writes `finetune_run.json`.

    Raises:
        ValueError: `run_dir` holds a run with different settings, naming what changed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "finetune_run.json"
    identity = json.loads(json.dumps(identity, default=str))
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in identity.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{run_dir} holds a fine-tuning run with other settings {changed} (before, now): "
                             "use another run.name (one per round) or delete that directory")
    else:
        path.write_text(json.dumps(identity, indent=2))
