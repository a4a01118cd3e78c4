"""SERVER SIDE — duplicate removal: exact (normalised text) and near-duplicate by a selectable measure.

The measures are the baselines the papers compare (`ksg_ray.common.text_metrics`): TF-IDF cosine (KnowledgeSG's
0.52 to the seed examples), ROUGE-L F1 and MiniLM embedding cosine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ksg_ray.common.text_metrics import pairwise_similarity

__all__ = ["near_duplicates", "normalise", "similar_to_any"]


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: "Is it safe?" and "is it  safe" are one text."""
    return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.?!\"'")


def near_duplicates(texts: Sequence[str], method: str, threshold: float) -> dict[int, int]:
    """{index: index of the earlier text it duplicates} for every text at least `threshold` similar to a kept
    earlier one. Order matters: pass texts best first, so the better of two duplicates is the one kept.

    Exact duplicates (after `normalise`) are found first without computing similarities.
    """
    dropped: dict[int, int] = {}
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        key = normalise(t)
        if key in first:
            dropped[i] = first[key]
        else:
            first[key] = i
    remaining = [i for i in range(len(texts)) if i not in dropped]
    if len(remaining) < 2:
        return dropped
    sim = pairwise_similarity([texts[i] for i in remaining], [texts[i] for i in remaining], method)
    kept: list[int] = []
    for a, i in enumerate(remaining):
        match = next((b for b in kept if sim[a, b] >= threshold), None)
        if match is None:
            kept.append(a)
        else:
            dropped[i] = remaining[match]
    return dropped


def similar_to_any(texts: Sequence[str], references: Sequence[str], method: str,
                   threshold: float) -> list[float | None]:
    """Per text, its highest similarity to a reference when that reaches `threshold`, else None."""
    if not texts or not references:
        return [None] * len(texts)
    best = pairwise_similarity(list(texts), list(references), method).max(axis=1)
    return [float(s) if s >= threshold else None for s in best]
