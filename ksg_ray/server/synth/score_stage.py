"""SERVER SIDE — scoring of candidate answers: the bundle's DP reward model and perplexity under the DP generator.

Both come from the client's bundle, loaded once per actor: the reward model (LoRA + scalar head on its public
base) and the generator (public base + DP adapter) through the engine layer. RewardDS ranks candidates by both
(`ksg_ray.server.synth.reward_filter`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ksg_ray.engines import build_engine, check_messages
from ksg_ray.engines.stage import (
    ERROR_COLUMN,
    describe,
    incoming_errors,
    is_missing,
    passthrough,
    plain,
    run_with_fallback,
    to_messages,
)
from ksg_ray.server.bundle_models import component_base, load_reward

__all__ = ["ScoreUDF"]


class ScoreUDF:
    """A `map_batches` callable class: every candidate of a row gets a reward and a log-probability.

    Columns read: `query` (str), `prompt_column` (the answer prompt whose reply each candidate is, for
    perplexity), `candidates_column` (list of answer texts; None or empty = nothing to score).
    Columns written: `<candidates_column>_reward` and `<candidates_column>_logprob` (lists aligned with the
    candidates: reward logit, mean answer-token log-probability; perplexity = exp(-logprob)), `__error__`.

    Args:
        bundle_dir: the client's transfer bundle (reward and generator components).
        engine_kind: engine of the generator for perplexity.
        candidates_column: the input column of answers.
        prompt_column: the input column of prompts.
        engine_kwargs: extra engine options.
        reward_batch_size: rows per reward-model forward pass (a row: one question and its answers, up to 8).
    """

    def __init__(self, bundle_dir: str, engine_kind: str, candidates_column: str = "candidates",
                 prompt_column: str = "answer_messages", engine_kwargs: dict | None = None,
                 reward_batch_size: int = 16) -> None:
        import torch

        self.reward_model, self.reward_tokenizer = load_reward(bundle_dir,
                                                               "cuda" if torch.cuda.is_available() else "cpu")
        self.engine = build_engine(engine_kind, component_base(bundle_dir, "generator"),
                                   str(Path(bundle_dir) / "generator"), **(engine_kwargs or {}))
        self.fatal_errors = tuple(getattr(self.engine, "fatal_errors", ()))
        self.candidates_column, self.prompt_column = candidates_column, prompt_column
        self.reward_batch_size = reward_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from ksg_ray.common.reward_model import score_texts

        errors = incoming_errors(batch)
        work: dict[int, tuple[str, list[dict], list[str]]] = {}
        for i in range(len(errors)):
            candidates = plain(batch[self.candidates_column][i])
            if errors[i] is not None or is_missing(candidates) or not candidates:
                continue
            try:
                prompt = check_messages(to_messages(batch[self.prompt_column][i]))
            except ValueError as e:
                errors[i] = describe(e)
                continue
            work[i] = (str(batch["query"][i]), prompt, list(candidates))

        def score(idx: list[int]) -> list[tuple[list[float], list[float]]]:
            questions = [work[i][0] for i in idx for _ in work[i][2]]
            prompts = [work[i][1] for i in idx for _ in work[i][2]]
            answers = [a for i in idx for a in work[i][2]]
            rewards = score_texts(self.reward_model, self.reward_tokenizer, questions, answers,
                                  batch_size=self.reward_batch_size)
            logprobs = self.engine.score(prompts, answers)
            out, k = [], 0
            for i in idx:
                n = len(work[i][2])
                out.append(([float(r) for r in rewards[k:k + n]],
                            [float(lp) if math.isfinite(lp) else None for lp in logprobs[k:k + n]]))
                k += n
            return out

        results, row_errors = run_with_fallback(score, sorted(work), self.fatal_errors)
        errors = [row_errors.get(i, e) for i, e in enumerate(errors)]
        out = passthrough(batch)
        out[f"{self.candidates_column}_reward"] = [None if (r := results.get(i)) is None else r[0]
                                                   for i in range(len(errors))]
        out[f"{self.candidates_column}_logprob"] = [None if (r := results.get(i)) is None else r[1]
                                                    for i in range(len(errors))]
        out[ERROR_COLUMN] = errors
        return out
