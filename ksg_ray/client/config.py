"""Typed configs of the client-side DP training jobs (`ksg dp-train`, `ksg dp-reward`).

Defaults are the embedded default: SmolLM2-135M, the demo data, ε = 8, a local Ray cluster on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ksg_ray.common.config import StrictModel
from ksg_ray.common.sections import (
    DataSection,
    LoraSection,
    ModelSection,
    RunSection,
    ScalingSection,
    TrainSection,
)

__all__ = ["CandidatesSection", "DPFinetuneConfig", "DPDataSection", "DPRewardConfig", "DPRunSection",
           "DataSection", "EvalSection",
           "LoraSection", "ModelSection", "PrivacySection", "RunSection", "ScalingSection", "TrainSection"]


class PrivacySection(StrictModel):
    target_epsilon: float = Field(8.0, description="ε for the whole run (inf = the non-private baseline)")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ; must be < 1/N for N private records")
    max_grad_norm: float = Field(1.0, gt=0, description="per-record clip norm C")
    accountant: Literal["prv", "rdp"] = Field("prv", description="accountant used to calibrate σ and report ε")
    target_scope: Literal["run", "total"] = Field(
        "run", description="run = target_epsilon is this run's own ε (the papers: each model at ε = 8); total = "
                           "σ is chosen so that this run composed with the published runs on these records (the "
                           "ledger's) reaches target_epsilon: the DP reward model after the generator, for a bundle "
                           "at the same ε as a single DP fine-tune")
    total_epsilon_budget: float | None = Field(
        None, gt=0, description="cap on the composed ε of all models trained on these records (None = no cap)")
    noise_seed: int | None = Field(None, description="tests only: a known seed lets anyone subtract the noise")
    sampling_seed: int | None = Field(None, description="tests only; None = a secret random seed")
    ledger_dir: Path | None = Field(
        None, description="the client's privacy ledger, one for all its runs on any data (None = $KSG_LEDGER_DIR, "
                          "else $KSG_CACHE/client/ledger, i.e. ~/.cache/ksg-ray/client/ledger)")
    disjoint_data: bool = Field(
        False, description="true only if these records are about other people than the ledger's other runs: the run "
                           "then composes only with runs sharing a record with it (record fingerprints) instead of "
                           "with every published run; privacy.json says so")
    publish: bool = Field(
        True, description="false = an evaluation-only run (the non-private baseline, the ε grid): recorded in the "
                          "ledger as unpublished, never counted toward a bundle's ε or the budget, no bundle written")

    @field_validator("target_epsilon")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (or inf for the non-private baseline), got {v}")
        return v

    @property
    def private(self) -> bool:
        return not math.isinf(self.target_epsilon)


class DPDataSection(DataSection):
    question_loss: bool = Field(
        True, description="generator: loss on the question as well as the answer, so the server can sample new "
                          "questions from it (KnowledgeSG); same DP guarantee (one example per record)")


class DPRunSection(RunSection):
    bundle_dir: Path = Field(Path("runs/bundle"), description="where the transfer bundle is written")


class DPFinetuneConfig(StrictModel):
    """`ksg dp-train`: DP LoRA fine-tuning of the generator on the client's private records."""

    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DPDataSection = DPDataSection()
    privacy: PrivacySection = PrivacySection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: DPRunSection = DPRunSection()

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
    ray: bool = Field(True, description="on Ray Data actor pools (False: each source's engine in the job's process, "
                      "one after the other; no actors to start, for a small run on one machine)")
    non_dp_proxy_adapter: Path | None = Field(
        None, description="NOT DP: answers of a non-private proxy trained on the records; marks the bundle not DP")


class EvalSection(StrictModel):
    path: str | None = Field(None, description="held-out records for pairwise accuracy (truth ranked above base)")
    limit: int = Field(48, gt=0)


class RewardRunSection(DPRunSection):
    name: str = Field("reward", description="run name inside output_dir (a rerun resumes it)")


class DPRewardConfig(DPFinetuneConfig):
    """`ksg dp-reward`: DP reward proxy (LoRA + scalar head, Bradley–Terry) on the same private records."""

    run: RewardRunSection = RewardRunSection()
    candidates: CandidatesSection = CandidatesSection()
    eval: EvalSection = EvalSection()
