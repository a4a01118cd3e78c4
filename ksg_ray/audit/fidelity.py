"""AUDIT SIDE — how much a synthetic set resembles the client's domain, and how much of it copies the records.

The server cannot measure this (it never sees the records); the client's auditor can, so it lives here:

- **nearest-real share**: the fraction of synthetic questions whose MiniLM cosine to their nearest *training*
  question reaches the 5th percentile of the same figure for the *held-out* real questions (the minimum when
  fewer than 20 are held out). A real question not trained on passes by construction at 95%; an off-domain one
  does not.
- **MAUVE** (Pillutla et al. 2021, the `mauve-text` package) between synthetic and held-out real texts, on our
  MiniLM features: it quantises the embeddings, so it works on small sets.
- **loop share** and **other-language share**: answers with a repeated word 6-gram; rows in another language;
- **copy share**: synthetic questions or answers that near-copy a training record (cosine >= 0.95, or a shared
  run of `copy_ngram` words). Fidelity alone would reward copying.

Every figure is an aggregate: no record's text leaves through it. The 2-D projection plot shows real and
synthetic points, no text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ksg_ray.common.text_metrics import embed_texts, repeated_ngram, words

__all__ = ["copy_flags", "fidelity_report", "mauve_score", "nearest_real_share", "other_language_share",
           "plot_projection"]

COPY_COSINE = 0.95
COPY_NGRAM = 16  # a shared run of 16 words is a copied sentence, not a common phrase ("what should I do about it")


def nearest_real_share(synthetic: np.ndarray, train: np.ndarray, held_out: np.ndarray,
                       percentile: float = 5.0) -> tuple[float, float]:
    """(share of synthetic embeddings at least as close to the training set as the held-out ones, threshold).

    All inputs are unit-length embeddings [n, d]. The threshold is the `percentile` of the held-out rows'
    nearest-training cosines (their minimum when fewer than 20 rows are held out).
    """
    if len(synthetic) == 0 or len(train) == 0 or len(held_out) == 0:
        raise ValueError("nearest_real_share needs synthetic, training and held-out rows")
    ref = (held_out @ train.T).max(1)
    threshold = float(ref.min() if len(ref) < 20 else np.percentile(ref, percentile))
    nearest = (synthetic @ train.T).max(1)
    return float((nearest >= threshold).mean()), threshold


def mauve_score(synthetic: np.ndarray, real: np.ndarray, seed: int = 25) -> float | None:
    """MAUVE between two embedding sets; None below 20 rows a side, where its quantisation (rows / 5 clusters)
    has too few clusters to tell distributions apart (with 8 held-out rows it reads near 1 for anything)."""
    if min(len(synthetic), len(real)) < 20:
        return None
    import mauve

    buckets = max(2, min(len(synthetic), len(real)) // 5)
    out = mauve.compute_mauve(p_features=real, q_features=synthetic, num_buckets=buckets, seed=seed, verbose=False)
    return float(out.mauve)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def copy_flags(synthetic_texts: Sequence[str], synthetic: np.ndarray, train_texts: Sequence[str],
               train: np.ndarray, ngram: int = COPY_NGRAM, cosine: float = COPY_COSINE,
               common_texts: Sequence[str] = ()) -> list[bool]:
    """Per synthetic text: does it near-copy a training text (cosine >= `cosine`, or an `ngram`-word run found in
    exactly one training text and in none of `common_texts`, the held-out records)?"""
    if len(train_texts) == 0:
        return [False] * len(synthetic_texts)
    close = (synthetic @ train.T).max(1) >= cosine
    # a run shared by several training records is boilerplate ("thanks for using Chat Doctor, I have gone
    # through your query..."), not one record's text: only runs unique to one record count as a copy
    counts = Counter(g for t in train_texts for g in _ngrams(t, ngram))
    seen = {g for g, c in counts.items() if c == 1}
    seen -= {g for t in common_texts for g in _ngrams(t, ngram)}  # ... nor one that held-out records share too
    return [bool(c) or not _ngrams(t, ngram).isdisjoint(seen) for t, c in zip(synthetic_texts, close, strict=True)]


def fidelity_report(synthetic: Sequence[dict], train: Sequence[Any], held_out: Sequence[Any],
                    plot: Path | None = None) -> dict[str, Any]:
    """The fidelity and copy figures of a synthetic set (rows with `input`/`output`) against the client's
    training records and its held-out records (`Record`s), and optionally the projection plot.

    Returns:
        {"rows", "nearest_real_share", "nearest_real_threshold", "mauve", "copy_share", "copy_share_questions",
        "copy_share_answers", "loop_share", "other_language_share", "plot"}.
    """
    if not synthetic:
        return {"rows": 0}
    s_q = embed_texts([r["input"] for r in synthetic])
    s_a = embed_texts([r["output"] for r in synthetic])
    t_q = embed_texts([r.input for r in train])
    t_a = embed_texts([r.output for r in train])
    h_q = embed_texts([r.input for r in held_out])
    share, threshold = nearest_real_share(s_q, t_q, h_q)
    copied_q = copy_flags([r["input"] for r in synthetic], s_q, [r.input for r in train], t_q,
                          common_texts=[r.input for r in held_out])
    copied_a = copy_flags([r["output"] for r in synthetic], s_a, [r.output for r in train], t_a,
                          common_texts=[r.output for r in held_out])
    s_qa = embed_texts([f"{r['input']}\n{r['output']}" for r in synthetic])
    h_qa = embed_texts([f"{r.input}\n{r.output}" for r in held_out])
    out = {"rows": len(synthetic), "nearest_real_share": share, "nearest_real_threshold": threshold,
           "mauve": mauve_score(s_qa, h_qa),
           "copy_share": float(np.mean([a or b for a, b in zip(copied_q, copied_a, strict=True)])),
           "copy_share_questions": float(np.mean(copied_q)), "copy_share_answers": float(np.mean(copied_a)),
           "loop_share": float(np.mean([repeated_ngram(r["output"], 6) is not None for r in synthetic])),
           "other_language_share": other_language_share(synthetic), "plot": None}
    if plot is not None:
        out["plot"] = str(plot_projection({"training questions": t_q, "held-out questions": h_q,
                                           "synthetic questions": s_q}, plot))
    return out


def other_language_share(rows: Sequence[dict], language: str = "en", min_confidence: float = 0.5) -> float:
    """Share of rows whose question or answer py3langid places in another language (the synthesis filter's rule)."""
    from ksg_ray.server.synth.filters import LanguageFilter

    detect = LanguageFilter(language, min_confidence)
    flags = [q is not None or a is not None for q, a in zip(detect([r["input"] for r in rows]),
                                                             detect([r["output"] for r in rows]), strict=True)]
    return float(np.mean(flags)) if flags else 0.0


def plot_projection(groups: dict[str, np.ndarray], path: Path) -> Path:
    """A 2-D PCA projection of embedding groups (fitted on all of them together), one colour per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacked = np.concatenate(list(groups.values()))
    centre = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked - centre, full_matrices=False)
    fig, ax = plt.subplots(figsize=(6, 5))
    for (name, e), marker in zip(groups.items(), ["o", "s", "x", "^"], strict=False):
        xy = (e - centre) @ vt[:2].T
        ax.scatter(xy[:, 0], xy[:, 1], s=14, marker=marker, alpha=0.7, label=f"{name} ({len(e)})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("MiniLM embeddings, 2-D PCA: real vs synthetic")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
