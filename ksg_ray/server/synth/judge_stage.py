"""SERVER SIDE — the professional filter (KnowledgeSG): a strong public model judges each synthetic query.

The verdict is read from the model's own probabilities of answering "Yes" vs "No" (two `Engine.score` calls),
not parsed from generated text: every query gets a verdict, even from a small model that would ramble, and the
probability is kept as provenance so the threshold can be changed after the fact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ksg_ray.engines import build_engine, check_messages
from ksg_ray.engines.stage import (
    ERROR_COLUMN,
    describe,
    incoming_errors,
    is_missing,
    passthrough,
    run_with_fallback,
    to_messages,
)

__all__ = ["JudgeUDF"]


class JudgeUDF:
    """A `map_batches` callable class: judge prompts in, P(yes) and a pass/fail verdict out.

    Columns read: `messages_column` (the judge prompt per row; None = no judgement needed).
    Columns written: `judge_yes_probability` (float or None), `judge_pass` (bool or None), `__error__`.

    Args:
        engine_kind: "transformers", "vllm" or "auto".
        model_path: the professional model.
        min_yes_probability: P(yes) / (P(yes) + P(no)) a query needs to pass.
        messages_column: the input column.
        engine_kwargs: extra engine options.
    """

    def __init__(self, engine_kind: str, model_path: str, min_yes_probability: float = 0.5,
                 messages_column: str = "judge_messages", engine_kwargs: dict | None = None) -> None:
        self.engine = build_engine(engine_kind, model_path, None, **(engine_kwargs or {}))
        self.fatal_errors = tuple(getattr(self.engine, "fatal_errors", ()))
        self.threshold = min_yes_probability
        self.messages_column = messages_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        errors = incoming_errors(batch)
        prompts: dict[int, list[dict]] = {}
        for i, raw in enumerate(batch[self.messages_column]):
            if errors[i] is None and not is_missing(raw):
                try:
                    prompts[i] = check_messages(to_messages(raw))
                except ValueError as e:
                    errors[i] = describe(e)

        def yes_probability(idx: list[int]) -> list[float]:
            chats = [prompts[i] for i in idx]
            if hasattr(self.engine, "yes_probability"):  # an endpoint: no logits, a Yes/No reply
                return self.engine.yes_probability(chats)
            # one call: an engine that scores one-token answers from the prompt's next-token distribution
            # (transformers) reads both from one forward pass
            scores = self.engine.score(chats + chats, ["Yes"] * len(idx) + ["No"] * len(idx))
            yes, no = scores[:len(idx)], scores[len(idx):]
            return [1.0 / (1.0 + math.exp(n - y)) for y, n in zip(yes, no, strict=True)]

        results, row_errors = run_with_fallback(yes_probability, sorted(prompts), self.fatal_errors)
        errors = [row_errors.get(i, e) for i, e in enumerate(errors)]
        out = passthrough(batch)
        out["judge_yes_probability"] = [results.get(i) for i in range(len(errors))]
        out["judge_pass"] = [None if (p := results.get(i)) is None else p >= self.threshold
                             for i in range(len(errors))]
        out[ERROR_COLUMN] = errors
        return out
