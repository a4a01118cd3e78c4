"""Fidelity figures (audit side): they separate real held-out questions from off-domain ones, and the copy share
catches planted copies of training records. Reads the real medical and financial splits in ../shared/data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ksg_ray.audit.fidelity import copy_flags, fidelity_report
from ksg_ray.common.records import load_records
from ksg_ray.common.text_metrics import embed_texts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "medical" / "train.jsonl").is_file(),
                                reason="shared domain data not present")


def _rows(records) -> list[dict]:
    return [{"input": r.input, "output": r.output} for r in records]


@pytest.fixture(scope="module")
def splits():
    train = load_records(SHARED / "medical" / "train.jsonl", limit=240)
    dev = load_records(SHARED / "medical" / "dev.jsonl")
    finance = load_records(SHARED / "financial" / "train.jsonl", limit=48)
    return train, dev[:56], dev[56:104], finance


def test_fidelity_separates_real_held_out_from_off_domain(splits, tmp_path):
    train, held_out, real, finance = splits
    own = fidelity_report(_rows(real), train, held_out, plot=tmp_path / "p.png")
    other = fidelity_report(_rows(finance), train, held_out)
    assert own["nearest_real_share"] >= 0.85 and other["nearest_real_share"] <= 0.25
    assert own["mauve"] > other["mauve"] + 0.3
    assert own["other_language_share"] == 0.0 and own["loop_share"] <= 0.1
    # real answers share some signature boilerplate with a few training records (240 of them here)
    assert own["copy_share_questions"] == 0.0 and own["copy_share"] <= 0.1
    assert (tmp_path / "p.png").stat().st_size > 1000
    # answers moved to the wrong questions: the questions still look real, the pairs do not
    answers = [r["output"] for r in _rows(real)]
    random.Random(0).shuffle(answers)
    shuffled = [{"input": r.input, "output": a} for r, a in zip(real, answers, strict=True)]
    assert fidelity_report(shuffled, train, held_out)["mauve"] <= own["mauve"]


def test_copy_share_catches_planted_copies(splits):
    train, held_out, real, _ = splits
    rows = _rows(real[:20])
    rows[0] = {"input": train[3].input, "output": "Rest and drink water."}  # a verbatim question
    words = train[7].output.split()
    rows[1] = {"input": rows[1]["input"], "output": "Hello. " + " ".join(words[:20]) + " Take care."}  # a copied run
    out = fidelity_report(rows, train, held_out)
    assert out["copy_share_questions"] == pytest.approx(1 / 20)
    flags = copy_flags([r["output"] for r in rows], embed_texts([r["output"] for r in rows]),
                       [r.output for r in train], embed_texts([r.output for r in train]),
                       common_texts=[r.output for r in held_out])
    assert flags[1] and not flags[0] and out["copy_share"] >= 2 / 20
    rows[2] = {"input": "Ho mal di testa da tre giorni.", "output": "Riposa e bevi molta acqua, per favore."}
    assert fidelity_report(rows, train, held_out)["other_language_share"] == pytest.approx(1 / 20)
    json.dumps(out)  # plain JSON: it goes into the eval result


def test_embeddings_come_from_the_cache_and_do_not_depend_on_their_batch(monkeypatch):
    from ksg_ray.common import text_metrics

    texts = ["My knee hurts when I climb stairs.", "Is a fever of 39 C dangerous for a baby?", "Hello"]
    alone = np.stack([embed_texts([t])[0] for t in texts])
    monkeypatch.setattr(text_metrics, "_EMBEDDED", text_metrics.OrderedDict())
    together = embed_texts([texts[1], texts[0], texts[2], texts[0]])  # one batch of mixed lengths, a repeat
    np.testing.assert_allclose(together, alone[[1, 0, 2, 0]], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert len(text_metrics._EMBEDDED) == 3
    monkeypatch.setattr(text_metrics, "_minilm", lambda: pytest.fail("a cached text ran the model again"))
    np.testing.assert_array_equal(embed_texts(texts[::-1]), together[[2, 0, 1]])
