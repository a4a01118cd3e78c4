"""Model cards say what a model is: base, method, data, ε/δ with the accountant, and its evaluation."""

from __future__ import annotations

import json
import math

from ksg_ray.audit.model_card import write_model_card

RESULT = {"epsilon": 7.9, "n": 200, "engine": "transformers",
          "metrics": {"answer_loss": 2.5, "rougeL": 0.15, "loop_rate": 0.0, "judge": None},
          "metrics_ci": {"answer_loss": [2.4, 2.6], "rougeL": [0.14, 0.16], "loop_rate": [0.0, 0.0]}}
PRIVACY = {"epsilon": 7.9, "delta": 1e-5, "accountant": "prv", "composition": "PRV over the history", "not_dp": [],
           "mechanisms": [{"name": "generator", "noise_multiplier": 0.61, "sample_rate": 0.08, "steps": 25,
                           "records": 3164}, {"name": "reward", "noise_multiplier": 0.9, "sample_rate": 0.125,
                                              "steps": 8, "records": 1024}]}


def test_a_distilled_model_card_gives_base_data_privacy_and_evaluation(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "finetune_summary.json").write_text(json.dumps({"rows": 612, "rows_per_round": {"0": 400, "1": 212},
                                                                "epochs": 3, "best_epoch": 2}))
    card = write_model_card(tmp_path, method="pipeline", result=RESULT, privacy=PRIVACY,
                            base_model="smollm2-135m").read_text()
    assert card.startswith("---\nbase_model: smollm2-135m\nlibrary_name: peft\n")
    assert "612 synthetic question-answer rows (round 0: 400, round 1: 212)" in card
    assert "(ε = 7.9, δ = 1e-05)-DP" in card and "PRV" in card and "| generator | 0.61 | 0.08 | 25 | 3164 |" in card
    assert "| answer_loss | 2.500 | [2.400, 2.600] |" in card and "| rougeL | 0.150 | [0.140, 0.160] |" in card
    assert "200 held-out records" in card and "judge" not in card.split("## Evaluation")[1].split("\n\n")[2]


def test_a_non_private_model_card_says_so_first(tmp_path):
    card = write_model_card(tmp_path, method="non_private", result=RESULT | {"epsilon": math.inf}, privacy=PRIVACY,
                            base_model="smollm2-135m").read_text()
    assert "library_name: transformers" in card and "not-differentially-private" in card
    assert card.split("# non_private (ksg-ray)")[1].lstrip().startswith("**NOT DIFFERENTIALLY PRIVATE.**")
    assert "(ε = 7.9" not in card  # the bundle's ε is not this model's
