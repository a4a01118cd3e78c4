"""The engine contract (`generate`, `score`) batched on Ray Data, for jobs that run a model over many rows.

Evaluation and audits call `model.generate(prompts, params)` and `model.score(prompts, answers)`. A local
`Engine` answers in this process; `RayDataModel` answers the same calls by streaming the rows through an
autoscaling pool of engine actors (`ksg_ray.engines.stage` for generation, `LogprobUDF` here for
scoring), so a job moves from a laptop to a GPU cluster by configuration. A row that fails on an actor comes
back as None (generation) or NaN (score) with its error logged, never silently dropped; callers count them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ksg_ray.common.batching import longest_first
from ksg_ray.engines import Generation, SamplingParams, build_engine, check_messages
from ksg_ray.engines.stage import (
    ERROR_COLUMN,
    describe,
    incoming_errors,
    passthrough,
    run_with_fallback,
    to_messages,
)

__all__ = ["RayDataModel", "LogprobUDF"]

logger = logging.getLogger(__name__)


class LogprobUDF:
    """A `map_batches` callable class: (chat prompt, answer) in, the answer's mean token log-prob out.

    Columns read: `messages` (a list of {"role", "content"} messages per row) and `answer` (a string).
    Columns written: `score` (float; NaN for an empty answer or a failed row) and `__error__` (None, or
    "Type: message"). Other columns pass through.

    Args:
        engine_kind: "transformers", "vllm" or "auto".
        model_path: a local model folder or hub id.
        adapter_path: a peft adapter folder, or None.
        engine_kwargs: extra engine options.
    """

    def __init__(self, engine_kind: str, model_path: str, adapter_path: str | None,
                 engine_kwargs: dict | None = None) -> None:
        self.engine = build_engine(engine_kind, model_path, adapter_path, **(engine_kwargs or {}))
        self.fatal_errors = tuple(getattr(self.engine, "fatal_errors", ()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Score one batch; see the class docstring for the columns.

        Raises:
            KeyError: the batch lacks `messages` or `answer` (a pipeline error, not a row error).
        """
        for column in ("messages", "answer"):
            if column not in batch:
                raise KeyError(f"LogprobUDF needs the column {column!r}; the batch has {sorted(batch)}")
        errors = incoming_errors(batch)
        work: dict[int, tuple[list[dict], str]] = {}
        for i, (raw, answer) in enumerate(zip(batch["messages"], batch["answer"], strict=True)):
            if errors[i] is not None:
                continue
            try:
                if not isinstance(answer, str):
                    raise ValueError(f"answer must be a string, got {type(answer).__name__}")
                work[i] = (check_messages(to_messages(raw)), answer)
            except ValueError as e:  # malformed rows are known without running the model
                errors[i] = describe(e)
        results, row_errors = run_with_fallback(
            lambda idx: self.engine.score([work[i][0] for i in idx], [work[i][1] for i in idx]), sorted(work),
            self.fatal_errors)
        out = passthrough(batch)
        out["score"] = np.asarray([results.get(i, math.nan) for i in range(len(errors))], dtype=np.float64)
        out[ERROR_COLUMN] = [row_errors.get(i, e) for i, e in enumerate(errors)]
        return out


class RayDataModel:
    """`generate` and `score` over a Ray Data actor pool; each call is one streamed dataset.

    Every call starts its own actor pool (loading the model once per actor), so batch many rows per call.

    Args:
        engine_kind: "transformers", "vllm" or "auto".
        model_path: a local model folder or hub id, readable on every node.
        adapter_path: a peft adapter folder readable on every node, or None.
        batch_size: rows per engine call.
        max_actors: the most actors a pool scales to (each holds a model).
        num_cpus: CPUs per actor.
        num_gpus: GPUs per actor (0 on CPU).
        engine_kwargs: extra engine options.

    Examples:
        >>> model = RayDataModel("auto", resolve_model("smollm2-135m"), None, batch_size=16)
        >>> model.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=16))
    """

    def __init__(self, engine_kind: str, model_path: str, adapter_path: str | None = None, *, batch_size: int = 16,
                 max_actors: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                 engine_kwargs: dict | None = None) -> None:
        if batch_size < 1 or max_actors < 1:
            raise ValueError(f"batch_size and max_actors must be positive, got {batch_size} and {max_actors}")
        self.engine_kind, self.model_path, self.adapter_path = engine_kind, model_path, adapter_path
        self.batch_size, self.max_actors = batch_size, max_actors
        self.num_cpus, self.num_gpus, self.engine_kwargs = num_cpus, num_gpus, engine_kwargs

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Generation] | None]:
        """`params.n` answers per prompt, in prompt order; None for a row that failed (error logged)."""
        import ray.data

        from ksg_ray.engines.stage import generate_dataset

        if not prompts:
            return []
        ds = ray.data.from_items([{"idx": i, "messages": prompts[i]} for i in longest_first(prompts)])
        out = generate_dataset(ds, engine_kind=self.engine_kind, model_path=self.model_path,
                               adapter_path=self.adapter_path, sampling=params, batch_size=self.batch_size,
                               max_actors=self.max_actors, num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                               engine_kwargs=self.engine_kwargs)
        results: list[list[Generation] | None] = [None] * len(prompts)
        for row in out.select_columns(["idx", "generations", "generations_finished", "__error__"]).iter_rows():
            if row["__error__"]:
                logger.warning("prompt %d: generation failed: %s", row["idx"], row["__error__"])
                continue
            # num_tokens is not carried through the stage's columns; -1 says "unknown".
            results[row["idx"]] = [Generation(text=t, finished=bool(f), num_tokens=-1)
                                   for t, f in zip(row["generations"], row["generations_finished"], strict=True)]
        return results

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """Mean answer-token log-prob per (prompt, answer), in order; NaN for a failed row (error logged)."""
        import ray.data

        if len(prompts) != len(answers):
            raise ValueError(f"score needs one answer per prompt, got {len(prompts)} prompts, {len(answers)} answers")
        if not prompts:
            return []
        ds = ray.data.from_items([{"idx": i, "messages": prompts[i], "answer": answers[i]}
                                  for i in longest_first(prompts, answers)])
        out = ds.map_batches(
            LogprobUDF, fn_constructor_kwargs=dict(engine_kind=self.engine_kind, model_path=self.model_path,
                                                 adapter_path=self.adapter_path, engine_kwargs=self.engine_kwargs),
            batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.max_actors),
            num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        scores = [math.nan] * len(prompts)
        for row in out.select_columns(["idx", "score", "__error__"]).iter_rows():
            if row["__error__"]:
                logger.warning("row %d: scoring failed: %s", row["idx"], row["__error__"])
            scores[row["idx"]] = float(row["score"])
        return scores
