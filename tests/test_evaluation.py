"""Utility evaluation: the judge's score parse, metric aggregation with failed rows counted, and `ksg eval` end to
end on Ray Data (tiny model) with the privacy audit's inputs, then `ksg report` on its run directory."""

from __future__ import annotations

import json
import math

import pytest

from ksg_ray import cli
from ksg_ray.audit.utility import (
    JUDGE_SYSTEM,
    evaluate_utility,
    judge_answers,
    judge_messages,
    parse_judge_score,
    utility_metrics,
)
from ksg_ray.common.records import Record, load_records, write_jsonl
from ksg_ray.common.run_layout import RunLayout, read_eval_results
from ksg_ray.engines import Generation, SamplingParams


@pytest.mark.parametrize("reply,score", [
    ("Score: 7", 7.0), ("score:9", 9.0), ("**Score:** 8", 8.0), ("Score: 7.5", 7.5), ("Rating = 5", 5.0),
    ("My grade is 9", 9.0), ("8/10", 8.0), ("I would rate this 6 out of 10.", 6.0), ("10/10", 10.0),
    ("On a scale of 1 to 10, I give it a 4.", 4.0), ("On a scale of 1-10: Score: 3", 3.0), ("7", 7.0),
    ("**8**.", 8.0), ("Score: 7\nFinal score: 8", 8.0), ("Score: 7/10 because 1 to 10", 7.0),
    ("1. Accuracy: good 2. Score: 6", 6.0),
    # nothing in range: missing, never guessed
    ("Score: N", None), ("Score: 0", None), ("Score: 11", None), ("Score: 100", None), ("The answer is good.", None),
    ("There are 3 issues.", None), ("", None), (None, None),
])
def test_judge_score_parse(reply, score):
    assert parse_judge_score(reply) == score


def test_judge_prompt_holds_rubric_question_reference_and_answer():
    record = Record("If you are a doctor, answer.", "I have a cough.", "Rest and fluids.")
    system, user = judge_messages(record, "Drink water.")
    assert system == {"role": "system", "content": JUDGE_SYSTEM} and "1 - empty" in JUDGE_SYSTEM
    for part in ("If you are a doctor, answer.", "I have a cough.", "REFERENCE:\nRest and fluids.",
                 "ANSWER:\nDrink water."):
        assert part in user["content"]


def test_utility_metrics_leave_out_and_count_failed_rows():
    refs = ["Rest and drink plenty of fluids.", "See a doctor if the fever lasts.", "Take the tablets twice a day."]
    out = utility_metrics([refs[0], None, "Completely unrelated words here."], refs)
    assert out["per_record"][1] is None
    assert out["per_record"][0]["rouge1"] == out["per_record"][0]["rougeL"] == 1.0
    assert out["per_record"][0]["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert out["per_record"][2]["rouge1"] == 0.0 and out["per_record"][2]["embedding_cosine"] < 0.5
    assert out["rouge1"] == pytest.approx(0.5) and 0 < out["bleu"] < 100
    assert utility_metrics([None], ["x"])["rouge1"] is None
    with pytest.raises(ValueError, match="one reference per prediction"):
        utility_metrics(["a"], ["a", "b"])


class CannedJudge:
    """Replies given in advance: the parse/count logic, apart from any model (the model path is tested below)."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, params):
        self.prompts += prompts
        return [None if r is None else [Generation(r, True, 3)] for r in self.replies[:len(prompts)]]


def test_judge_counts_parsed_unparseable_failed_and_unanswered():
    records = [Record("", f"q{i}", f"a{i}") for i in range(4)]
    judge = CannedJudge(["Score: 8", "I think it is fine", None])
    result = judge_answers(judge, records, ["x", "y", "z", None])
    assert result.scores == [8.0, None, None, None] and result.mean == 8.0
    assert result.summary() == {"mean": 8.0, "parsed": 1, "unparsed": 1, "failed": 1, "not_asked": 1}
    assert len(judge.prompts) == 3  # the unanswered record is not graded


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_evaluate_utility_on_a_real_engine_reports_unparseable_judge_replies(tiny_model_path, one_thread):
    from ksg_ray.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model_path, batch_size=4)
    records = load_records("demo:medical", limit=3)
    result = evaluate_utility(engine, records, SamplingParams(max_new_tokens=8), judge=engine,
                              judge_max_new_tokens=6)
    # A random model answers and judges: every reply is counted, none is turned into a made-up score.
    judge = result.counts["judge"]
    assert judge["parsed"] + judge["unparsed"] == 3 and judge["failed"] == 0
    assert result.metrics["judge"] is None if judge["parsed"] == 0 else 1 <= result.metrics["judge"] <= 10
    assert result.counts["answered"] == 3 and len(result.rows) == 3
    assert [r["reference"] for r in result.rows] == [r.output for r in records]


def test_eval_job_end_to_end_then_report(ray_cluster, tmp_path, capsys):
    from ksg_ray.bundle import dump_privacy
    from ksg_ray.client.canary import inject_canaries, write_secrets

    demo = load_records("demo:medical", limit=12)
    planted, secrets = inject_canaries(demo[:8], 0.5, seed=0)  # 4 canaries in the "training" records
    write_jsonl(planted, tmp_path / "train_canaries.jsonl")
    write_secrets(secrets, tmp_path / "secrets.json")
    write_jsonl(demo[8:], tmp_path / "heldout.jsonl")
    layout = RunLayout(tmp_path / "run")
    layout.synth_dir.mkdir(parents=True)
    layout.synthetic.write_text(json.dumps({"instruction": "", "input": "q", "output": f"Hi, {secrets[1]['name']}!",
                                            "provenance": {"round": 0}}) + "\n")
    layout.bundle_dir.mkdir()
    layout.privacy.write_text(dump_privacy({"epsilon": math.inf, "delta": 1e-5, "not_dp": [], "mechanisms": []}))

    args = ["eval", "configs/evaluate.yaml", "model.name=tiny-random", "judge.model=tiny-random",
            f"data.path={tmp_path / 'heldout.jsonl'}", "data.limit=4", "data.max_new_tokens=8",
            "judge.max_new_tokens=6", f"audit.secrets={tmp_path / 'secrets.json'}",
            f"audit.canary_records={tmp_path / 'train_canaries.jsonl'}", "audit.max_new_tokens=8",
            f"run.dir={layout.root}", "run.method=nondp", "run.family=ksg", "run.epsilon=inf", "engine.batch_size=4"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "method      nondp (ε=∞)" in printed and "MIA AUC" in printed

    raw = json.loads(layout.eval_file("nondp").read_text())
    assert raw["epsilon"] == "inf" and raw["family"] == "ksg" and raw["n"] == 4
    assert set(raw["metrics"]) == {"rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine", "judge", "answer_loss",
                                   "unfinished_rate", "loop_rate"}
    assert 0 <= raw["metrics"]["unfinished_rate"] <= 1 and raw["counts"]["reference_coverage"] is not None
    assert raw["metrics"]["answer_loss"] > 0  # the held-out answer loss (mean NLL per reference-answer token)
    lo, hi = raw["metrics_ci"]["rougeL"]
    assert lo <= raw["metrics"]["rougeL"] <= hi  # its 95% bootstrap interval over the held-out records
    assert raw["counts"]["answered"] == 4
    judge = raw["counts"]["judge"]
    assert judge["parsed"] + judge["unparsed"] + judge["failed"] == 4
    privacy = raw["privacy"]
    assert privacy["canary_rate_synthetic"] == 0.25  # 1 of 4 secrets planted in the synthetic file
    assert privacy["canary_rate_generations"] == 0.0  # a random model reproduces none
    assert 0.0 <= privacy["mia_auc"] <= 1.0 and raw["audit"]["mia"]["members"] == 8  # 8 training records
    assert raw["audit"]["mia"]["nonmembers"] == 4 and raw["audit"]["bundle_privacy"]["dp"] is False
    assert secrets[1]["name"] not in layout.eval_file("nondp").read_text()  # no secret in the result
    assert raw["fidelity"]["rows"] == 1 and 0 <= raw["fidelity"]["nearest_real_share"] <= 1  # vs the 8 members
    assert layout.eval_predictions("nondp").parent == layout.client_dir / "eval"  # held-out text: client side
    assert not list(layout.eval_dir.glob("*.predictions.jsonl"))
    rows = [json.loads(line) for line in layout.eval_predictions("nondp").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r.output for r in demo[8:12]]
    assert [r["method"] for r in read_eval_results(layout.root)] == ["nondp"]

    assert cli.main(["report", str(layout.root)]) == 0
    md = layout.report.read_text()
    assert "| `nondp` | ∞ | 4 |" in md and "WARNING: ε = ∞" in md and "funnel.json` missing" in md
    assert (layout.report_dir / "privacy_utility.png").stat().st_size > 0


def test_eval_job_refuses_overlapping_members_and_nonmembers(tmp_path):
    from ksg_ray.client.canary import inject_canaries, write_secrets
    from ksg_ray.jobs import evaluate

    planted, secrets = inject_canaries(load_records("demo:medical", limit=8), 0.25, seed=0)
    write_jsonl(planted, tmp_path / "train.jsonl")
    write_secrets(secrets, tmp_path / "secrets.json")
    with pytest.raises(ValueError, match="both members .* and non-members"):  # held-out = the same demo records
        evaluate.main([f"audit.secrets={tmp_path / 'secrets.json'}", f"audit.canary_records={tmp_path / 'train.jsonl'}",
                       f"run.dir={tmp_path}"])


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    from ksg_ray.audit.utility import bootstrap_ci

    values = [0.1, 0.4, 0.35, None, 0.2, 0.5, 0.3, 0.25, 0.45]
    lo, hi = bootstrap_ci(values)
    known = [v for v in values if v is not None]
    assert lo < sum(known) / len(known) < hi and 0.1 <= lo and hi <= 0.5
    assert bootstrap_ci(values) == [lo, hi]  # seeded: the report is reproducible
    assert bootstrap_ci([0.3]) is None  # one record has no interval
    wide = bootstrap_ci([0.0, 1.0] * 4)
    narrow = bootstrap_ci([0.0, 1.0] * 64)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]  # more records, a tighter interval
