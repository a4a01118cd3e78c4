"""Typed configs of the client-side DP training jobs (`ksg dp-train`, `ksg dp-reward`).

Defaults are the embedded default: SmolLM2-135M, the demo data, ε = 8, a local Ray cluster on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ksg_ray.config import StrictModel

__all__ = ["CandidatesSection", "DPFinetuneConfig", "DPRewardConfig", "DataSection", "EvalSection", "LoraSection",
           "ModelSection", "PrivacySection", "RunSection", "ScalingSection", "TrainSection"]


class ModelSection(StrictModel):
    name: str = Field("smollm2-135m", description="smollm2-135m | tiny-random | a Hugging Face id | a local path")


class LoraSection(StrictModel):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling α")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 under DP, as in KnowledgeSG)")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="modules that get adapters")


class DataSection(StrictModel):
    path: str = Field("demo", description="private records: demo | demo:financial | *.jsonl | *.parquet | hf:NAME")
    limit: int | None = Field(None, gt=0, description="use only the first N records")
    max_seq_len: int = Field(256, ge=32, description="tokens per record; longer records are truncated and counted")


class PrivacySection(StrictModel):
    target_epsilon: float = Field(8.0, description="ε for the whole run (inf = the non-private baseline)")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ; must be < 1/N for N private records")
    max_grad_norm: float = Field(1.0, gt=0, description="per-record clip norm C")
    accountant: Literal["prv", "rdp"] = Field("prv", description="accountant used to calibrate σ and report ε")
    total_epsilon_budget: float | None = Field(
        None, gt=0, description="cap on the composed ε of all models trained on these records (None = no cap)")
    noise_seed: int | None = Field(None, description="tests only: a known seed lets anyone subtract the noise")
    sampling_seed: int | None = Field(None, description="tests only; None = a secret random seed")

    @field_validator("target_epsilon")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (or inf for the non-private baseline), got {v}")
        return v

    @property
    def private(self) -> bool:
        return not math.isinf(self.target_epsilon)


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


class ScalingSection(StrictModel):
    num_workers: int = Field(1, gt=0, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy=deepspeed)")
    bf16: bool = Field(False, description="bf16 autocast in forward (GPU)")


class RunSection(StrictModel):
    output_dir: Path = Field(Path("runs/dp"), description="Ray Train storage and job outputs")
    name: str = Field("generator", description="run name inside output_dir (a rerun resumes it)")
    bundle_dir: Path = Field(Path("runs/bundle"), description="where the transfer bundle is written")
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from")


class DPFinetuneConfig(StrictModel):
    """`ksg dp-train`: DP LoRA fine-tuning of the generator on the client's private records."""

    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    privacy: PrivacySection = PrivacySection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _consistent(self) -> DPFinetuneConfig:
        if self.train.physical_batch_size < 1:
            raise ValueError("train.physical_batch_size must be >= 1")
        if self.scaling.strategy == "ddp" and self.scaling.zero_stage != 1:
            raise ValueError("scaling.zero_stage is a DeepSpeed setting: set scaling.strategy=deepspeed")
        return self


class CandidatesSection(StrictModel):
    """Where the reward model's candidate answers come from (RewardDS step 2)."""

    generator_bundle: Path = Field(Path("runs/bundle"), description="bundle holding the DP generator adapter")
    engine: Literal["transformers", "vllm", "auto"] = "transformers"
    max_new_tokens: int = Field(96, gt=0, description="greedy answer length of the base and DP models")
    batch_size: int = Field(8, gt=0, description="prompts per engine call")
    max_actors: int = Field(2, gt=0, description="engine actors the Ray Data pool scales up to (each holds a model)")
    non_dp_proxy_adapter: Path | None = Field(
        None, description="NOT DP: answers of a non-private proxy trained on the records; marks the bundle not DP")


class EvalSection(StrictModel):
    path: str | None = Field(None, description="held-out records for pairwise accuracy (truth ranked above base)")
    limit: int = Field(48, gt=0)


class RewardRunSection(RunSection):
    name: str = Field("reward", description="run name inside output_dir (a rerun resumes it)")


class DPRewardConfig(DPFinetuneConfig):
    """`ksg dp-reward`: DP reward proxy (LoRA + scalar head, Bradley–Terry) on the same private records."""

    run: RewardRunSection = RewardRunSection()
    candidates: CandidatesSection = CandidatesSection()
    eval: EvalSection = EvalSection()
