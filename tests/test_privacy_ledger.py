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
