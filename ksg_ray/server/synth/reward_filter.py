"""SERVER SIDE — Reward Guided Filtering and the refinement pool rule of RewardDS, as pure functions.

Per query, candidates are ranked by reward (higher is better) and by perplexity under the DP generator (lower
is better); combined rank = α·reward rank + (1−α)·perplexity rank; the best candidate is the positive, the
worst the negative. The queries whose positive has the highest reward are kept (top `keep_fraction`).
Refinement keeps a query's best rewrite when its reward reaches the lowest reward already in the pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["average_ranks", "best_rewrite", "combined_ranks", "keep_top", "positive_negative"]


def average_ranks(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """1-based ranks (1 = best); tied values share their average rank, so ties favour no candidate."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher_is_better else values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def combined_ranks(rewards: Sequence[float], logprobs: Sequence[float | None], alpha: float) -> list[float]:
    """α·rank(reward) + (1−α)·rank(perplexity); an answer without a log-probability ranks last on perplexity.

    Perplexity = exp(−mean log-prob), so ranking by log-prob descending is ranking by perplexity ascending.
    """
    lp = [-math.inf if v is None or not math.isfinite(v) else v for v in logprobs]
    by_reward = average_ranks(rewards, higher_is_better=True)
    by_ppl = average_ranks(lp, higher_is_better=True)
    return [alpha * r + (1 - alpha) * p for r, p in zip(by_reward, by_ppl, strict=True)]


def positive_negative(rewards: Sequence[float], logprobs: Sequence[float | None], alpha: float) -> tuple[int, int]:
    """Indices of the best and the worst candidate by combined rank (ties broken by reward, then order).

    Raises:
        ValueError: no candidates.
    """
    if not rewards:
        raise ValueError("a query needs at least one scored candidate to have a positive and a negative")
    ranks = combined_ranks(rewards, logprobs, alpha)
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], -rewards[i], i))
    return order[0], order[-1]


def keep_top(positive_rewards: dict[str, float], keep_fraction: float) -> list[str]:
    """Ids of the ceil(keep_fraction · N) queries whose positive has the highest reward (at least one)."""
    if not positive_rewards:
        return []
    k = max(1, math.ceil(keep_fraction * len(positive_rewards)))
    return sorted(positive_rewards, key=lambda q: (-positive_rewards[q], q))[:k]


def best_rewrite(rewards: Sequence[float], finished: Sequence[bool], pool_min: float) -> int | None:
    """Index of the highest-reward finished rewrite whose reward reaches `pool_min`, or None."""
    ok = [i for i, (r, f) in enumerate(zip(rewards, finished, strict=True)) if f and r >= pool_min]
    return max(ok, key=lambda i: (rewards[i], -i)) if ok else None
