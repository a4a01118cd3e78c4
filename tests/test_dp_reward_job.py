"""`ksg dp-reward` end to end on a tiny model: candidates via Ray Data, DP reward training, one bundle with
both models and their composed ε, and the server side loading both from the bundle without the data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import private_data_moved_away

from ksg_ray.bundle import verify_bundle
from ksg_ray.client.privacy.accountant import epsilon_for
from ksg_ray.common.reward_model import score_texts
from ksg_ray.server.bundle_models import load_generator, load_reward

pytestmark = pytest.mark.e2e  # real Ray clusters and trainings: the long tests, at their smallest settings

def test_bundle_holds_both_models_and_their_composed_epsilon(client_bundle):
    tmp, _, summary = client_bundle
    manifest = verify_bundle(tmp / "bundle")
    assert {"generator/adapter_model.safetensors", "reward/adapter_model.safetensors"} <= set(manifest["files"])
    privacy = json.loads((tmp / "bundle" / "privacy.json").read_text())
    mechs = {m["name"]: m for m in privacy["mechanisms"]}
    assert set(mechs) == {"generator", "reward"}
    history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in mechs.values()]
    assert float(privacy["epsilon"]) == pytest.approx(epsilon_for(history, privacy["delta"]), rel=1e-9)
    assert float(privacy["epsilon"]) > max(epsilon_for([h], privacy["delta"]) for h in history)
    assert privacy["not_dp"] == []
    assert summary["candidate_failures"] == 0


def test_candidates_hold_three_answers_per_record(client_bundle):
    tmp, private, _ = client_bundle
    cands = json.loads((tmp / "runs" / "reward" / "candidates.json").read_text())
    assert len(cands["base"]) == len(cands["dp_generator"]) == 20
    assert all(isinstance(a, str) for a in cands["base"] + cands["dp_generator"])


def test_server_loads_both_models_from_the_bundle_without_the_data(client_bundle):
    tmp, _, _ = client_bundle
    with private_data_moved_away(tmp):  # the server never has the client's data
        gen, tok = load_generator(tmp / "bundle")
        ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            assert gen(**ids).logits.shape[-1] == gen.config.vocab_size
        reward, rtok = load_reward(tmp / "bundle")
        scores = score_texts(reward, rtok, ["Is it safe?", "Is it safe?"], ["Yes, with care.", "No."])
        assert len(scores) == 2 and all(s == s for s in scores)  # finite, not NaN
        # answers to one question packed in a row, rows in batches grouped by length: each pair gets the reward
        # it gets alone, in the input order
        questions = ["Is it safe?", "What dose of ibuprofen is safe for an adult with a sore back?", "Why?",
                     "Is it safe?"]
        answers = ["Yes, with care.", "No.", "Up to 400 mg every six hours, with food. " * 3, "Ask your doctor."]
        grouped = score_texts(reward, rtok, questions, answers, batch_size=2)
        in_order = score_texts(reward, rtok, questions, answers, batch_size=2, max_padding=None)
        alone = [score_texts(reward, rtok, [q], [a])[0] for q, a in zip(questions, answers, strict=True)]
        assert grouped == pytest.approx(in_order, abs=1e-5) and grouped == pytest.approx(alone, abs=1e-5)
        assert len({round(s, 4) for s in grouped}) == 4
        # the head was trained: it is not the freshly initialised one
        trained_head = [v for k, v in reward.state_dict().items() if "score" in k and "modules_to_save" in k]
        assert trained_head and float(trained_head[0].abs().sum()) > 0
