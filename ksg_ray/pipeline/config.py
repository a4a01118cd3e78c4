"""Typed config of `ksg pipeline`: every stage in order, each from its own YAML plus overrides.

The pipeline only wires paths between the stages (bundle → synthesis → fine-tune → evaluation → serve) and
runs the baselines through the same code; each stage's knobs stay in its own config file. The private data path
is given to the client stages only; in a real deployment those run on the client's machine and everything
under `client/` stays there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ksg_ray.common.config import StrictModel

__all__ = ["BASELINES", "STAGE_ORDER", "SYNTH_VARIANTS", "CanarySection", "PipelineConfig", "PipelineServeSection",
           "StageSection"]

STAGE_ORDER = ("dp_train", "dp_reward", "synthesize", "finetune", "evaluate", "report", "serve")
# The synthesis baselines of the two papers, as overrides of the same synthesis config; each gets its own
# synthesis + fine-tune and is evaluated like the pipeline. (The pipeline itself is "both combined".) A variant
# that writes few rows is still trained (min_rows=0); one that writes none is reported as not run.
SYNTH_VARIANTS: dict[str, list[str]] = {
    # DP synthetic data without filtering: the DP generator writes queries and answers, every one is kept
    "dp_synthetic": ["professional.filter=false", "answers.sources=[generator]", "answers.n=1",
                     "scoring.keep_fraction=1.0", "refine.rounds=0", "min_rows=0"],
    # KnowledgeSG: professional filter + the professional model's answers (distillation), no reward model
    "knowledgesg": ["queries.mode=sample", "professional.filter=true", "answers.sources=[professional]",
                    "answers.n=1", "scoring.keep_fraction=1.0", "refine.rounds=0", "min_rows=0"],
    # RewardDS: the DP generator's candidates, reward-guided filtering and refinement rounds, no professional model
    "rewardds": ["queries.mode=seed_prompt", "professional.filter=false", "answers.sources=[generator]",
                 "min_rows=0"],
}
# what each evaluated method is: base model, non-private fine-tune on the private data (through the DP code
# at ε = inf), the DP fine-tuned generator alone, the synthesis variants, and the full pipeline's distilled model
BASELINES = ("base", "non_private", "dp_finetune", *SYNTH_VARIANTS, "pipeline")


class StageSection(StrictModel):
    config: Path | None = Field(None, description="the stage's YAML; None = configs/<its default>.yaml")
    overrides: list[str] = Field([], description="key=value overrides of that config")


class CanarySection(StrictModel):
    fraction: float = Field(0.0, ge=0, le=1, description="share of private records that get a fake-PII canary "
                                                         "for the privacy audit (0 = no canaries)")
    seed: int = 0
    field: Literal["input", "output"] = Field(
        "output", description="where canaries go: output = the start of an answer (what training teaches the model "
                              "to write: extraction can show a leak); input = the question (only MIA can)")


class PipelineServeSection(StrictModel):
    enabled: bool = Field(False, description="deploy the distilled model on Ray Serve at the end (left running)")
    port: int = Field(8000, gt=0, lt=65536)
    host: str = Field("127.0.0.1", description="0.0.0.0 on a cluster head")


class PipelineConfig(StrictModel):
    """`ksg pipeline`: DP generator → DP reward → synthesis → fine-tune rounds → evaluation → report → serve."""

    run_dir: Path = Field(Path("runs/pipeline"), description="every stage's output (see ksg_ray.common.run_layout)")
    data: str = Field("demo", description="CLIENT SIDE: the private records (read by dp_train and dp_reward only)")
    data_limit: int | None = Field(None, gt=0, description="CLIENT SIDE: use only the first N records (before the "
                                                            "held-out split); None = all")
    held_out: int = Field(8, ge=1, description="CLIENT SIDE: the last N private records are held out of training "
                                               "and used as the evaluation (and fine-tuning dev) split")
    canaries: CanarySection = CanarySection()
    stages: list[Literal[STAGE_ORDER]] = Field(list(STAGE_ORDER[:-1]), description="stages to run, in order")
    rounds: int = Field(1, ge=0, description="RewardDS refinement rounds after round 0, each with the current "
                                             "fine-tuned target as the rewriter")
    refine_epochs: float | None = Field(None, gt=0, description="fine-tuning epochs of rounds >= 1 (RewardDS: 3 after "
                                                                "8 in round 0); None = the finetune config's")
    baselines: list[Literal[BASELINES]] = Field(["base", "non_private", "dp_finetune", "pipeline"],
                                                description=f"methods to evaluate, of {BASELINES}")
    dp_finetune: Literal["answer_only", "generator"] = Field(
        "answer_only", description="the dp_finetune baseline: answer_only = DP LoRA on the answers alone, like "
        "every other fine-tune, at the generator's ε, as an evaluation-only client run (its own ledger entry); "
        "generator = the bundle's DP generator itself, also trained on questions (question_loss), no extra run")
    epsilon_grid: list[float] = Field([], description="extra DP fine-tunes of the generator at these ε (each in its "
                                                      "own ledger), evaluated as dp_finetune@<ε>: the privacy-utility "
                                                      "plot's line; the bundle's own ε is always on it")

    @field_validator("epsilon_grid")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not e > 0 for e in v):
            raise ValueError(f"epsilon_grid values must be > 0 (inf allowed), got {v}")
        return v
    dp_train: StageSection = StageSection(config=Path("configs/dp_finetune.yaml"))
    dp_reward: StageSection = StageSection(config=Path("configs/dp_reward.yaml"))
    synthesize: StageSection = StageSection(config=Path("configs/synthesize.yaml"))
    finetune: StageSection = StageSection(config=Path("configs/finetune.yaml"))
    evaluate: StageSection = StageSection(config=Path("configs/evaluate.yaml"))
    serve: PipelineServeSection = PipelineServeSection()
