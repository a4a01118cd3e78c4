"""Config sections every training job shares (DP jobs on the client, the fine-tune on the server).

Defaults are the embedded default: SmolLM2-135M, the demo data, a local Ray cluster on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ksg_ray.common.config import StrictModel
from ksg_ray.common.hardware import resolve_bf16

__all__ = ["DataSection", "LoraSection", "ModelSection", "RunSection", "ScalingSection", "TrainSection"]


class ModelSection(StrictModel):
    name: str = Field("smollm2-135m", description="smollm2-135m | tiny-random | a Hugging Face id | a local path")


class LoraSection(StrictModel):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling α")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 under DP, as in KnowledgeSG)")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="modules that get adapters")
    top_layers: int | None = Field(
        None, gt=0, description="adapters in the top N transformer layers only (null = every layer): the backward "
                                "pass stops below them (SmolLM2-135M, top 10 of 30: 1.64x the step speed) but "
                                "the dev loss does not hold (+0.22 to +0.45 nats; bench/lora_top_layers.py)")


class DataSection(StrictModel):
    path: str = Field("demo", description="private records: demo | demo:financial | *.jsonl | *.parquet | hf:NAME")
    limit: int | None = Field(None, gt=0, description="use only the first N records")
    max_seq_len: int = Field(
        384, ge=32, description="tokens per record (384 holds 91% of the medical records whole); a longer record "
                                "loses the end of its answer, end-of-turn included, and is counted")


class TrainSection(StrictModel):
    epochs: float = Field(1.0, gt=0, description="passes over the data in expectation (steps = epochs / q)")
    max_steps: int | None = Field(None, gt=0, description="cap on steps (σ is calibrated for the capped run)")
    expected_batch_size: int = Field(8, gt=0, description="logical batch: sample rate q = this / N")
    physical_batch_size: int = Field(8, gt=0, description="records per forward pass (memory only)")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    checkpoint_every: int = Field(20, gt=0, description="steps between checkpoints")
    seed: int = Field(0, description="seed of the LoRA initialisation")
    probe_records: int = Field(16, gt=0, description="training records whose loss is measured before and after "
                               "(a diagnostic that moves with the model only; each measure is a forward pass)")


class ScalingSection(StrictModel):
    num_workers: int = Field(
        1, ge=0, description="Ray Train workers; 0 = Ray Train's local mode: the loop runs in the job's own process "
                             "(no worker processes to start: a DP fine-tune 62.6 -> 39.3 s on 2 cores; one process: "
                             "no DeepSpeed, no worker restarts; a rerun resumes from the run's checkpoints, "
                             "`local_train`)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        {}, description="custom Ray resources each worker asks for besides its CPUs/GPUs: a cluster pins workers "
                        "to the nodes that offer them (e.g. {trainer_slot: 1} on each node = one worker per node)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray Train's placement of the workers: PACK fills a node first, SPREAD uses many")
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy=deepspeed)")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast in forward; auto = where the hardware has it (CUDA bf16, CPU AMX / "
                            "AVX-512 bf16). DP clipping and noise stay float32")

    @property
    def use_bf16(self) -> bool:
        """`bf16` resolved for this machine."""
        return resolve_bf16(self.bf16, self.use_gpu)


class RunSection(StrictModel):
    output_dir: Path = Field(Path("runs/dp"), description="Ray Train storage and job outputs")
    name: str = Field("generator", description="run name inside output_dir (a rerun resumes it)")
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from")
