"""SERVER SIDE — typed config of `ksg finetune`: the synthetic data set, public dev data, how to train and export.

The model, LoRA, data, train, scaling and run sections are the DP jobs' own (`ksg_ray.client.config`), extended
where fine-tuning needs more; there is no privacy section: this model only ever sees outputs of DP models
(the synthetic data set), so it needs no DP and none is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from ksg_ray.common.config import StrictModel
from ksg_ray.common.sections import DataSection, LoraSection, ModelSection, RunSection, ScalingSection, TrainSection

__all__ = ["BUNDLE_PREFIX", "DevSection", "FinetuneConfig", "FinetuneDataSection", "FinetuneRunSection",
           "FinetuneTrainSection", "InitSection"]

BUNDLE_PREFIX = "bundle:"


class FinetuneDataSection(DataSection):
    path: str = Field("runs/synth/synthetic.jsonl",
                      description="the synthetic data set (.jsonl | .parquet) written by `ksg synthesize`")
    max_round: int | None = Field(
        None, ge=0, description="train on rows with round <= this (0 = the filtered pool; r = + refinement round r); "
                                "None = every row")


class DevSection(StrictModel):
    path: str | None = Field(
        None, description="PUBLIC held-out records for model selection (.jsonl | .parquet); None = hold out "
                          "`limit` queries of the round-0 pool (every row with those queries leaves training)")
    limit: int = Field(16, ge=0, description="dev records scored per epoch (greedy generation: the cost of an eval); "
                                             "0 = no dev set: every row trains and the last epoch is exported (a "
                                             "one-epoch run has nothing to select)")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="without dev.path: hold out at most this fraction of the round-0 queries "
                                     "(at least one), and at most `limit`")
    max_new_tokens: int = Field(64, gt=0, description="greedy tokens per dev answer")
    batch_size: int = Field(8, gt=0, description="dev prompts per generate call")


class InitSection(StrictModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: str | None = Field(
        None, alias="from",
        description="null = the public base | a model dir written by `ksg finetune` (continue from it) | "
                    "bundle:DIR = the bundle's DP generator adapter (KnowledgeSG's option)")


class FinetuneTrainSection(TrainSection):
    epochs: float = Field(3, gt=0, description="passes over the data (whole numbers; RewardDS: 8 in round 1, then 3)")
    expected_batch_size: int = Field(8, gt=0, description="records per optimizer step, over all workers")
    physical_batch_size: int = Field(4, gt=0, description="records per forward pass on one worker (memory only)")
    checkpoint_every: int = Field(50, gt=0, description="steps between mid-epoch checkpoints (every epoch end is one)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping of the batch gradient (0 = off)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the steps with a linear warm-up")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (large models)")


class FinetuneRunSection(RunSection):
    output_dir: Path = Field(Path("runs/finetune"), description="Ray Train storage and job outputs")
    name: str = Field("round0", description="run name inside output_dir (a rerun resumes it; one name per round)")


class FinetuneConfig(StrictModel):
    """`ksg finetune`: fine-tune the target model on the synthetic data set (loss on answers), on Ray Train."""

    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: FinetuneDataSection = FinetuneDataSection()
    dev: DevSection = DevSection()
    init: InitSection = InitSection()
    train: FinetuneTrainSection = FinetuneTrainSection()
    scaling: ScalingSection = ScalingSection()
    run: FinetuneRunSection = FinetuneRunSection()
    mode: Literal["lora", "full"] = Field("lora", description="train LoRA adapters, or every weight but the "
                                                              "input embeddings (RewardDS)")
    export: Literal["adapter", "merged"] = Field(
        "adapter", description="the model dir holds a peft adapter over the public base, or merged full weights")
    select_by: Literal["rouge_l"] = Field("rouge_l", description="dev metric that picks the exported epoch")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        problems = []
        if self.train.epochs != int(self.train.epochs):
            problems.append(f"train.epochs must be a whole number for fine-tuning, got {self.train.epochs}")
        if self.mode == "full" and self.export == "adapter":
            problems.append("export=adapter needs mode=lora (a full fine-tune has no adapter): set export=merged")
        if self.scaling.strategy == "ddp" and self.scaling.zero_stage != 1:
            problems.append("scaling.zero_stage is a DeepSpeed setting: set scaling.strategy=deepspeed")
        if self.train.physical_batch_size > self.train.expected_batch_size:
            problems.append("train.physical_batch_size must be <= train.expected_batch_size")
        init = self.init.from_
        if init is not None and init.startswith(BUNDLE_PREFIX) and not init[len(BUNDLE_PREFIX):]:
            problems.append("init.from=bundle: needs the bundle directory, e.g. bundle:runs/bundle")
        if problems:
            raise ValueError("; ".join(problems))
        return self
