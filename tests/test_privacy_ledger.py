"""One privacy budget for every model trained on the same records: composition and refusal."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from ksg_ray.client.privacy.accountant import Mechanism, calibrate_noise
from ksg_ray.client.privacy.ledger import check_budget, open_ledger, privacy_report
from ksg_ray.jobs import dp_reward

DELTA = 1e-5


def _event(m: Mechanism):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(m.sample_rate, dpa.GaussianDpEvent(m.noise_multiplier)),
                                   m.steps)


def test_composed_epsilon_of_generator_and_reward_matches_an_independent_accountant(tmp_path):
    gen = Mechanism("generator", calibrate_noise(4.0, DELTA, 0.02, 150), 0.02, 150)
    rew = Mechanism("reward", calibrate_noise(4.0, DELTA, 0.04, 50), 0.04, 50)
    ledger = open_ledger(tmp_path, "demo", DELTA)
    ledger.record(gen)
    ledger.record(rew)
    ledger.save()
    report = privacy_report(open_ledger(tmp_path, "demo", DELTA))  # reloaded from disk
    composed = dpa.ComposedDpEvent([_event(gen), _event(rew)])
    assert report["epsilon"] == pytest.approx(pld.PLDAccountant().compose(composed).get_epsilon(DELTA), rel=0.03)
    assert report["epsilon_rdp"] == pytest.approx(rdp.RdpAccountant().compose(composed).get_epsilon(DELTA), rel=0.01)
    assert report["epsilon"] > 4.0  # two models on the same records cost more than either alone
    assert [m["name"] for m in report["mechanisms"]] == ["generator", "reward"]


def test_a_rerun_replaces_its_own_entry_instead_of_double_counting(tmp_path):
    ledger = open_ledger(tmp_path, "demo", DELTA)
    ledger.record(Mechanism("generator", 1.0, 0.02, 100))
    ledger.record(Mechanism("generator", 1.0, 0.02, 100))
    assert len(ledger.mechanisms) == 1


def test_ledger_refuses_other_data_or_another_delta(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "", "input": "q", "output": "a"}\n')
    ledger = open_ledger(tmp_path, str(data), DELTA)
    ledger.record(Mechanism("generator", 1.0, 0.5, 3))
    ledger.save()
    with pytest.raises(ValueError, match="δ"):
        open_ledger(tmp_path, str(data), DELTA * 10)
    data.write_text('{"instruction": "", "input": "q2", "output": "a2"}\n')
    with pytest.raises(ValueError, match="other data"):
        open_ledger(tmp_path, str(data), DELTA)


def test_check_budget_names_the_numbers(tmp_path):
    ledger = open_ledger(tmp_path, "demo", DELTA)
    ledger.record(Mechanism("generator", calibrate_noise(6.0, DELTA, 0.02, 150), 0.02, 150))
    planned = Mechanism("reward", calibrate_noise(6.0, DELTA, 0.04, 50), 0.04, 50)
    with pytest.raises(ValueError, match=r"refused: training 'reward'.*> budget 7\.0.*generator"):
        check_budget(ledger, planned, 7.0)  # composed: ≈ 7.6
    assert check_budget(ledger, planned, None) > 6.0  # no cap: reported, not refused


def test_over_budget_reward_run_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "runs"
    ledger = open_ledger(out, "demo", 1e-3)
    ledger.record(Mechanism("generator", 0.7, 0.2, 10))
    ledger.save()
    spent = ledger.epsilon()
    with pytest.raises(ValueError, match="refused") as err:
        dp_reward.main(["model.name=tiny-random", "data.limit=24", "privacy.delta=1e-3",
                        f"privacy.total_epsilon_budget={spent + 0.5}", "privacy.target_epsilon=4",
                        f"run.output_dir={out}", f"candidates.generator_bundle={tmp_path / 'no-bundle'}"])
    assert f"{spent:.3f}" in str(err.value)
    assert not (out / "reward").exists()  # no candidates generated, no training started
    assert [m.name for m in open_ledger(out, "demo", 1e-3).mechanisms] == ["generator"]


def test_a_run_directory_cannot_be_resumed_by_another_mechanism(tmp_path):
    from ksg_ray.client.dp_trainer import DPRunSpec, DPTask, fit_dp

    spec = DPRunSpec(steps=3, sample_rate=0.2, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, lr=1e-3,
                     physical_batch_size=4, checkpoint_every=1, num_records=20)
    run = tmp_path / "generator"
    run.mkdir()
    (run / "dp_run.json").write_text(json.dumps({k: v for k, v in vars(spec).items()
                                                 if k not in ("noise_seed", "sampling_seed", "prior_history")}
                                                | {"mechanism": "generator"}))
    task = DPTask(None, [], None, None, None, None, name="reward")
    with pytest.raises(ValueError, match="other DP numbers.*mechanism"):
        fit_dp(task, spec, num_workers=1, use_gpu=False, cpus_per_worker=1, output_dir=tmp_path, name="generator",
               max_failures=0)


def _plan(tmp_path, run_name: str, eps: float = 4.0):
    from ksg_ray.client.config import DPFinetuneConfig
    from ksg_ray.client.privacy.engine import PrivacyEngine
    from ksg_ray.common.config import load_config

    cfg = load_config(DPFinetuneConfig, None, [f"run.output_dir={tmp_path}", f"run.name={run_name}",
                                               f"privacy.target_epsilon={eps}", "train.expected_batch_size=4"])
    engine = PrivacyEngine(cfg.privacy, cfg.run.output_dir, "demo")
    spec = engine.make_private("generator", 40, cfg.train, cfg.scaling, cfg.run)
    return engine, spec


def _record(engine, spec) -> None:
    engine.ledger.record(Mechanism("generator", spec.noise_multiplier, spec.sample_rate, spec.steps, engine.run_id))
    engine.ledger.save()


def test_two_generator_runs_on_one_client_dir_count_twice(tmp_path):
    """A second run (another run.name, or the same name after its directory was deleted) touched the data again:
    it is another ledger entry. Only a resume of the same run (its dp_run.json) replaces its own entry."""
    first, spec = _plan(tmp_path, "generator")
    _record(first, spec)
    alone = open_ledger(tmp_path, "demo", DELTA).epsilon()
    second, spec2 = _plan(tmp_path, "trial-2")
    assert second.run_id != first.run_id and spec2.prior_history == first.ledger.history()
    _record(second, spec2)
    third, spec3 = _plan(tmp_path, "generator")  # its directory was never kept (or was deleted): a fresh id
    _record(third, spec3)
    ledger = open_ledger(tmp_path, "demo", DELTA)
    assert len(ledger.mechanisms) == 3 and ledger.epsilon() > alone * 1.3
    # a resume reads its run id back from the run's dp_run.json and replaces its own entry
    run_dir = tmp_path / "trial-2"
    run_dir.mkdir()
    (run_dir / "dp_run.json").write_text(json.dumps({"run_id": second.run_id}))
    resumed, spec4 = _plan(tmp_path, "trial-2")
    assert resumed.run_id == second.run_id
    _record(resumed, spec4)
    assert len(open_ledger(tmp_path, "demo", DELTA).mechanisms) == 3


def test_two_jobs_saving_the_ledger_both_count(tmp_path):
    a, b = open_ledger(tmp_path, "demo", DELTA), open_ledger(tmp_path, "demo", DELTA)  # opened at the same time
    a.record(Mechanism("generator", 1.0, 0.1, 10, "generator:aaa"))
    b.record(Mechanism("reward", 1.0, 0.1, 10, "reward:bbb"))
    a.save()
    b.save()  # reloads under the lock and merges: a's run is kept
    assert sorted(m.key for m in open_ledger(tmp_path, "demo", DELTA).mechanisms) == ["generator:aaa", "reward:bbb"]


def test_a_reward_job_with_another_ledger_is_refused_with_the_numbers(tmp_path):
    from ksg_ray.client.privacy.ledger import check_recorded

    generator_dir, reward_dir = tmp_path / "gen", tmp_path / "rew"
    gen = open_ledger(generator_dir, "demo", DELTA)
    gen.record(Mechanism("generator", 0.8, 0.2, 25, "generator:abc"))
    released = privacy_report(gen)["mechanisms"]
    check_recorded(gen, released, "the generator bundle's privacy.json")  # the generator's own ledger: fine
    with pytest.raises(ValueError, match=r"generator:abc \(σ=0\.8000, q=0\.2000, 25 steps\) is not in this ledger"):
        check_recorded(open_ledger(reward_dir, "demo", DELTA), released, "the generator bundle's privacy.json")
    other = open_ledger(tmp_path / "other", "demo", DELTA)
    other.record(Mechanism("generator", 0.9, 0.2, 25, "generator:abc"))
    with pytest.raises(ValueError, match="the ledger says σ=0.9"):
        check_recorded(other, released, "the generator bundle's privacy.json")


def test_privacy_show_lists_every_run_and_the_composed_epsilon(tmp_path, capsys):
    from ksg_ray import cli

    runs = [Mechanism("generator", calibrate_noise(4.0, DELTA, 0.02, 150), 0.02, 150, "generator:one"),
            Mechanism("generator", calibrate_noise(2.0, DELTA, 0.05, 60), 0.05, 60, "generator:two"),
            Mechanism("reward", calibrate_noise(4.0, DELTA, 0.04, 50), 0.04, 50, "reward:three")]
    ledger = open_ledger(tmp_path, "demo", DELTA)
    for m in runs:
        ledger.record(m)
    ledger.save()
    assert cli.main(["privacy", "show", str(tmp_path), "--budget", "20"]) == 0
    out = capsys.readouterr().out
    assert all(m.run_id in out for m in runs)
    shown = float(out.split("composed    ε=")[1].split()[0])
    independent = pld.PLDAccountant().compose(dpa.ComposedDpEvent([_event(m) for m in runs])).get_epsilon(DELTA)
    assert shown == pytest.approx(independent, rel=0.01)
    assert f"{20 - shown:.3f} left" in out
