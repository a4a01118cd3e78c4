"""`ksg report`: the run-dir layout round-trips, the report renders every section and each plot is a real PNG,
missing inputs are named, and bad files are rejected with their path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ksg_ray import cli
from ksg_ray.audit.report import PLOTS, build_report, parse_grid, privacy_utility_figure
from ksg_ray.bundle import dump_privacy
from ksg_ray.common.run_layout import RunLayout, read_eval_results, read_funnel, write_eval_result, write_funnel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result(method, epsilon, rouge, auc, family=None, judge=6.0):
    return {"method": method, "family": family or method, "epsilon": epsilon, "model": {"kind": "test"}, "n": 16,
            "metrics": {"rouge1": rouge + 0.1, "rouge2": rouge / 2, "rougeL": rouge, "bleu": 100 * rouge / 3,
                        "embedding_cosine": 0.5 + rouge, "judge": judge},
            "privacy": {"canary_rate_synthetic": 0.0, "canary_rate_generations": auc - 0.5, "mia_auc": auc},
            "counts": {"judge": {"parsed": 12, "unparsed": 3, "failed": 1, "not_asked": 0}}}


@pytest.fixture
def run_dir(tmp_path):
    layout = RunLayout(tmp_path / "run")
    for r in (result("base", None, 0.10, 0.50), result("ksg@eps1", 1.0, 0.15, 0.52, "knowledgesg"),
              result("ksg@eps8", 8.0, 0.20, 0.55, "knowledgesg"),
              result("ksg@inf", math.inf, 0.25, 0.95, "knowledgesg", judge=None),
              result("rewardds@eps3", 3.0, 0.22, 0.6, "rewardds")):
        write_eval_result(layout.eval_file(r["method"]), r)
    rng = np.random.default_rng(0)
    candidates = rng.normal(0.0, 1.0, 200).tolist()
    write_funnel(layout.funnel, [("prompts", 64), ("query samples generated", 384), ("unique well-formed queries", 300),
                                 ("passed the professional filter", 210), ("kept by reward-guided filtering", 26)],
                 {"candidates": candidates, "kept": sorted(candidates)[-26:]})
    layout.bundle_dir.mkdir(parents=True)
    layout.privacy.write_text(dump_privacy({
        "epsilon": 8.0, "epsilon_rdp": 9.1, "delta": 1e-5, "accountant": "prv", "not_dp": ["non_dp_proxy_adapter"],
        "mechanisms": [{"name": "generator", "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 40}]}))
    return layout


def test_report_renders_every_section_and_each_plot_is_a_png(run_dir):
    from matplotlib.image import imread

    report = build_report(run_dir.root, epsilon_grid=[1, 4, 8, math.inf])
    assert report == run_dir.report
    md = report.read_text()
    for method in ("base", "ksg@eps1", "ksg@eps8", "ksg@inf", "rewardds@eps3"):
        assert f"| `{method}` |" in md
    assert "| `ksg@inf` | ∞ | 16 |" in md and "| `base` | — |" in md  # ε labels
    assert "12/16" in md  # judge replies parsed / graded
    assert "WARNING: not DP" in md and "non_dp_proxy_adapter" in md and "σ=0.9000" in md
    assert "No result at ε = 4" in md and "Off the ε grid, not plotted: `rewardds@eps3`" in md
    assert "| query samples generated | 384 | 6.000 |" in md
    assert "| kept by reward-guided filtering | 26 | 0.124 |" in md
    for name in PLOTS.values():
        path = run_dir.report_dir / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01, f"{name} is blank"
        assert f"]({name})" in md  # linked from the report


def test_the_utility_panels_show_each_point_with_its_interval():
    from matplotlib.container import ErrorbarContainer

    with_ci = [dict(result(m, e, rouge, 0.5, "ksg"), metrics_ci={"rougeL": [rouge - 0.02, rouge + 0.05],
                                                                   "answer_loss": [3.0 + e, 3.5 + e]})
               for m, e, rouge in (("ksg@eps1", 1.0, 0.15), ("ksg@eps8", 8.0, 0.2))]
    for r in with_ci:
        r["metrics"]["answer_loss"] = 3.2 + r["epsilon"]
    base = dict(result("base", None, 0.1, 0.5), metrics_ci={"rougeL": [0.08, 0.13]})
    fig = privacy_utility_figure([base, *with_ci], [1.0, 8.0], "rougeL")
    loss_ax, rouge_ax, _ = fig.axes  # answer loss first: the primary metric
    assert "answer loss" in loss_ax.get_title() and "ROUGE-L" in rouge_ax.get_title()
    (bars,) = [c for c in rouge_ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()  # one vertical bar per point, from lo to hi
    assert [tuple(np.round(seg[:, 1], 6)) for seg in segments] == [(0.13, 0.2), (0.18, 0.25)]
    (loss_bars,) = [c for c in loss_ax.containers if isinstance(c, ErrorbarContainer)]
    assert [tuple(seg[:, 1]) for seg in loss_bars.lines[2][0].get_segments()] == [(4.0, 4.5), (11.0, 11.5)]
    # the method without ε: its line sits in a band spanning its interval
    (band,) = rouge_ax.patches
    assert np.allclose([band.get_y(), band.get_y() + band.get_height()], [0.08, 0.13])


def test_missing_inputs_are_named_and_no_plot_is_drawn(tmp_path):
    (tmp_path / "empty").mkdir()
    md = build_report(tmp_path / "empty").read_text()
    assert "No evaluation results" in md and "funnel.json` missing" in md and "privacy.json` missing" in md
    assert not any((tmp_path / "empty" / "report" / name).exists() for name in PLOTS.values())


def test_ksg_report_cli(run_dir, capsys):
    assert cli.main(["report", str(run_dir.root), "--epsilon-grid", "1,8,inf", "--metric", "judge"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir.report)
    assert (run_dir.report_dir / PLOTS["privacy_utility"]).read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["report", str(run_dir.root / "nope")]) == 1
    assert parse_grid("1, 8,inf") == [1.0, 8.0, math.inf]
    with pytest.raises(ValueError, match="epsilon-grid"):
        parse_grid("1,eight")


def test_eval_results_round_trip_and_sort(run_dir):
    raw = json.loads(run_dir.eval_file("ksg@inf").read_text())
    assert raw["epsilon"] == "inf" and raw["metrics"]["judge"] is None  # JSON has no Infinity
    results = read_eval_results(run_dir.root)
    assert [r["method"] for r in results] == ["base", "ksg@eps1", "rewardds@eps3", "ksg@eps8", "ksg@inf"]
    assert math.isinf(results[-1]["epsilon"])


def test_bad_eval_file_and_method_names_are_rejected(run_dir, tmp_path):
    bad = result("x", 1.0, 0.1, 0.5)
    del bad["metrics"]["bleu"]
    with pytest.raises(ValueError, match=r"metrics\.bleu: missing"):
        write_eval_result(tmp_path / "x.json", bad)
    with pytest.raises(ValueError, match="epsilon must be"):
        write_eval_result(tmp_path / "x.json", result("x", -1.0, 0.1, 0.5))
    run_dir.eval_file("broken").write_text('{"method": "broken"}')
    with pytest.raises(ValueError, match=r"broken\.json: invalid evaluation result: missing key 'epsilon'"):
        read_eval_results(run_dir.root)
    with pytest.raises(ValueError, match="method name"):
        run_dir.eval_file("../escape")


def test_funnel_reads_the_synthesis_jobs_file_and_rejects_bad_ones(tmp_path):
    # The synthesis job's funnel.json holds more keys than the report reads, and tuples written as lists.
    (tmp_path / "funnel.json").write_text(json.dumps({
        "funnel": [("prompts", 4), ("written", 2)], "failed_rows": 0, "models": {"x": "y"},
        "rewards": {"candidates": [0.5, None, -1.0], "kept": [0.5]}}))
    assert read_funnel(tmp_path / "funnel.json") == {"funnel": [("prompts", 4), ("written", 2)],
                                                     "rewards": {"candidates": [0.5, -1.0], "kept": [0.5]}}
    (tmp_path / "bad.json").write_text(json.dumps({"funnel": [["prompts", -1]]}))
    with pytest.raises(ValueError, match=r"bad\.json: invalid funnel file: funnel\[0\]"):
        read_funnel(tmp_path / "bad.json")


def test_the_report_shows_fidelity_and_the_one_run_audit_beside_the_claimed_epsilon(run_dir):
    layout = run_dir
    fidelity = {"rows": 40, "nearest_real_share": 0.85, "nearest_real_threshold": 0.3, "mauve": 0.4,
                "copy_share": 0.0, "copy_share_questions": 0.0, "copy_share_answers": 0.0, "loop_share": 0.0,
                "other_language_share": 0.0, "plot": None}
    write_eval_result(layout.eval_file("pipeline"), result("pipeline", 8.0, 0.2, 0.5) | {"fidelity": fidelity})
    audit = layout.root / "client" / "dp" / "audit" / "one_run.json"
    audit.parent.mkdir(parents=True)
    audit.write_text(json.dumps({"epsilon_lower_bound": 0.0, "claimed_epsilon": 7.995, "trained_on": "canaries",
                                 "correct": 8, "guesses": 20, "canaries": 40, "confidence": 0.95,
                                 "max_possible_bound": 1.821}))
    md = build_report(layout.root).read_text()
    assert "| `pipeline` | 40 | 0.85 (cos ≥ 0.300) | 0.400 | 0.000 (0.000, 0.000) | 0.000 | 0.000 |" in md
    assert "| `client/dp/audit/one_run.json` | canaries | 7.995 | 0.000 | 8 / 20 | 40 | 95% | 1.821 |" in md
