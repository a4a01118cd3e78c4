"""One privacy budget for every model the client trains: composition, reservation and refusal."""

from __future__ import annotations

import json
import threading

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from ksg_ray.client.privacy.accountant import Mechanism, calibrate_noise
from ksg_ray.client.privacy.ledger import LedgerError, check_budget, open_ledger, privacy_report
from ksg_ray.common.records import Record, load_records
from ksg_ray.common.sections import ScalingSection
from ksg_ray.jobs import dp_reward

DELTA = 1e-5
RECORDS = load_records("demo", limit=40)


def _event(m: Mechanism):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(m.sample_rate, dpa.GaussianDpEvent(m.noise_multiplier)),
                                   m.steps)


def test_composed_epsilon_of_generator_and_reward_matches_an_independent_accountant(tmp_path):
    gen = Mechanism("generator", calibrate_noise(4.0, DELTA, 0.02, 150), 0.02, 150)
    rew = Mechanism("reward", calibrate_noise(4.0, DELTA, 0.04, 50), 0.04, 50)
    ledger = open_ledger(tmp_path, DELTA)
    ledger.record(gen)
    ledger.record(rew)
    ledger.save()
    report = privacy_report(open_ledger(tmp_path, DELTA))  # reloaded from disk
    composed = dpa.ComposedDpEvent([_event(gen), _event(rew)])
    independent = pld.PLDAccountant().compose(composed).get_epsilon(DELTA)
    assert independent <= report["epsilon"] <= 1.01 * independent  # PRV's upper bound: never below PLD
    assert report["epsilon_rdp"] == pytest.approx(rdp.RdpAccountant().compose(composed).get_epsilon(DELTA), rel=0.01)
    assert report["epsilon"] > 4.0  # two models on the same records cost more than either alone
    assert [m["name"] for m in report["mechanisms"]] == ["generator", "reward"]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(("target", "q", "steps"), [(8.0, 0.2, 5), (4.0, 0.02, 150), (1.0, 0.01, 1000)])
def test_calibrated_sigma_spends_just_under_the_target_as_opacus_search_does(target, q, steps, accountant):
    from opacus.accountants.utils import get_noise_multiplier

    from ksg_ray.client.privacy.accountant import epsilon_for

    sigma = calibrate_noise(target, DELTA, q, steps, accountant)
    assert target - 0.01 < epsilon_for([(sigma, q, steps)], DELTA, accountant) <= target
    reference = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                     accountant=accountant, epsilon_tolerance=0.01)
    assert sigma == pytest.approx(reference, rel=0.01)


def test_composed_calibration_lands_the_total_just_under_its_target():
    from ksg_ray.client.privacy.accountant import epsilon_for

    prior = [(calibrate_noise(4.0, DELTA, 0.2, 5), 0.2, 5)]
    sigma = calibrate_noise(8.0, DELTA, 0.2, 5, prior_history=prior)
    assert 8.0 - 0.01 < epsilon_for([*prior, (sigma, 0.2, 5)], DELTA) <= 8.0


def test_a_rerun_replaces_its_own_entry_instead_of_double_counting(tmp_path):
    ledger = open_ledger(tmp_path, DELTA)
    ledger.record(Mechanism("generator", 1.0, 0.02, 100))
    ledger.record(Mechanism("generator", 1.0, 0.02, 100))
    assert len(ledger.mechanisms) == 1


def test_ledger_refuses_another_delta_or_a_replaced_key(tmp_path):
    ledger = open_ledger(tmp_path, DELTA)
    ledger.record(Mechanism("generator", 1.0, 0.5, 3))
    ledger.save()
    with pytest.raises(ValueError, match="δ"):
        open_ledger(tmp_path, DELTA * 10)
    (tmp_path / "records.key").write_text("00" * 32)  # fingerprints under another key would match nothing
    with pytest.raises(LedgerError, match="replaced"):
        open_ledger(tmp_path, DELTA)
    (tmp_path / "records.key").unlink()
    with pytest.raises(LedgerError, match="missing"):
        open_ledger(tmp_path, DELTA)


def test_check_budget_names_the_numbers(tmp_path):
    ledger = open_ledger(tmp_path, DELTA)
    ledger.record(Mechanism("generator", calibrate_noise(6.0, DELTA, 0.02, 150), 0.02, 150))
    planned = Mechanism("reward", calibrate_noise(6.0, DELTA, 0.04, 50), 0.04, 50)
    with pytest.raises(ValueError, match=r"refused: training 'reward'.*> budget 7\.0.*generator"):
        check_budget(ledger, planned, 7.0)  # composed: ≈ 7.6
    assert check_budget(ledger, planned, None) > 6.0  # no cap: reported, not refused


def test_over_budget_reward_run_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "runs"
    ledger = open_ledger(out, 1e-3)
    ledger.record(Mechanism("generator", 0.7, 0.2, 10))
    ledger.save()
    spent = ledger.epsilon()
    with pytest.raises(ValueError, match="refused") as err:
        dp_reward.main(["model.name=tiny-random", "data.limit=24", "privacy.delta=1e-3",
                        f"privacy.total_epsilon_budget={spent + 0.5}", "privacy.target_epsilon=4",
                        f"run.output_dir={out}", f"privacy.ledger_dir={out}",
                        f"candidates.generator_bundle={tmp_path / 'no-bundle'}"])
    assert f"{spent:.3f}" in str(err.value)
    assert not (out / "reward").exists()  # no candidates generated, no training started
    assert [m.name for m in open_ledger(out, 1e-3).mechanisms] == ["generator"]


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
        fit_dp(task, spec, scaling=ScalingSection(), output_dir=tmp_path, name="generator", max_failures=0)


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """`PrivacyEngine.fit` with Ray Train stubbed out: what it does to the ledger, without a model. `fail` makes
    the training raise."""
    state = {"fail": False, "started": []}

    def fit_dp(task, spec, **_):
        state["started"].append(spec.run_id)
        if state["fail"]:
            raise RuntimeError("a worker died")
        return tmp_path / "checkpoint", {}

    monkeypatch.setattr("ksg_ray.client.privacy.engine.fit_dp", fit_dp)
    return state


def _plan(tmp_path, run_name: str, eps: float = 4.0, records: list[Record] = RECORDS, name: str = "generator",
          overrides: tuple[str, ...] = ()):
    """A `PrivacyEngine` on the client ledger in `tmp_path` with a planned run; returns (engine, spec, cfg)."""
    from ksg_ray.client.config import DPFinetuneConfig
    from ksg_ray.client.privacy.engine import PrivacyEngine
    from ksg_ray.common.config import load_config

    cfg = load_config(DPFinetuneConfig, None, [f"run.output_dir={tmp_path}", f"run.name={run_name}",
                                               f"privacy.target_epsilon={eps}", "train.expected_batch_size=4",
                                               f"privacy.ledger_dir={tmp_path}", *overrides])
    engine = PrivacyEngine(cfg.privacy, records)
    spec = engine.make_private(name, len(records), cfg.train, cfg.scaling, cfg.run)
    return engine, spec, cfg


def _train(engine, cfg) -> None:
    engine.fit(None, cfg.scaling, cfg.run)  # reserve, (stubbed) training, settle


def test_two_generator_runs_on_one_client_dir_count_twice(tmp_path, no_training):
    """A second run (another run.name, or the same name after its directory was deleted) touched the data again:
    it is another ledger entry. Only a resume of the same run (its checkpoint) replaces its own entry."""
    first, spec, cfg = _plan(tmp_path, "generator")
    _train(first, cfg)
    alone = open_ledger(tmp_path, DELTA).epsilon()
    second, spec2, cfg2 = _plan(tmp_path, "trial-2")
    assert second.run_id != first.run_id and spec2.prior_history == open_ledger(tmp_path, DELTA).history()
    _train(second, cfg2)
    third, spec3, cfg3 = _plan(tmp_path, "generator")  # its directory was never kept (or was deleted): a fresh id
    _train(third, cfg3)
    ledger = open_ledger(tmp_path, DELTA)
    assert len(ledger.mechanisms) == 3 and ledger.epsilon() > alone * 1.3
    assert {m.state for m in ledger.mechanisms} == {"trained"} and {m.records for m in ledger.mechanisms} == {40}
    # a resume reads its run id back from the run's dp_run.json (beside its checkpoint) and replaces its own entry
    run_dir = tmp_path / "trial-2"
    (run_dir / "checkpoint_0000001").mkdir(parents=True)
    (run_dir / "checkpoint_0000001" / "dp_state.pt").write_bytes(b"")
    (run_dir / "dp_run.json").write_text(json.dumps({"run_id": second.run_id}))
    resumed, spec4, cfg4 = _plan(tmp_path, "trial-2")
    assert resumed.run_id == second.run_id and spec4.resume
    _train(resumed, cfg4)
    assert len(open_ledger(tmp_path, DELTA).mechanisms) == 3


def test_a_run_from_step_0_never_reuses_a_run_id(tmp_path, no_training):
    """The checkpoints of a run were deleted, its dp_run.json kept: a new run there starts from step 0 and is a
    new entry (it used to read the old id back and replace the old run's entry)."""
    from ksg_ray.client.dp_trainer import run_identity

    first, _, cfg = _plan(tmp_path, "generator")
    _train(first, cfg)
    run_dir = tmp_path / "generator"
    run_dir.mkdir()
    (run_dir / "dp_run.json").write_text(json.dumps({"run_id": first.run_id}))  # what fit_dp writes
    assert run_identity(run_dir, "generator")[0] != first.run_id  # no checkpoint: a fresh id
    again, spec, cfg2 = _plan(tmp_path, "generator")
    assert again.run_id != first.run_id and not spec.resume and spec.run_id == again.run_id
    _train(again, cfg2)
    ids = [m.run_id for m in open_ledger(tmp_path, DELTA).mechanisms]
    assert ids == [first.run_id, again.run_id] and no_training["started"] == ids


def test_a_file_with_one_record_added_is_counted_in_the_same_ledger(tmp_path, no_training):
    """The ledger is the client's, not the file's: a copy with a record added (or fixed, or reordered) composes
    with the runs on the original, and with disjoint_data=true too, since the fingerprints overlap."""
    from ksg_ray.common.records import write_jsonl

    original, plus_one = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(RECORDS, original)
    write_jsonl(list(reversed(RECORDS)) + [Record("", "One more question?", "One more answer.", "x:1")], plus_one)
    first, _, cfg = _plan(tmp_path, "generator", records=load_records(original))
    _train(first, cfg)
    spent = open_ledger(tmp_path, DELTA).history()
    for flag in ("false", "true"):
        other, spec, _ = _plan(tmp_path, f"copy-{flag}", records=load_records(plus_one),
                               overrides=(f"privacy.disjoint_data={flag}",))
        assert other.record_set != first.record_set and spec.prior_history == spent  # counted: ε is composed
        assert other.report()["disjoint_data"] is (flag == "true")
    with pytest.raises(LedgerError, match=r"refused: .*> budget 5\.0.*" + first.run_id):  # and against the budget
        _plan(tmp_path, "copy", records=load_records(plus_one), overrides=("privacy.total_epsilon_budget=5",))


def test_data_declared_disjoint_composes_only_with_runs_sharing_a_record(tmp_path, no_training):
    first, _, cfg = _plan(tmp_path, "generator", records=RECORDS[:20])
    _train(first, cfg)
    _, default, _ = _plan(tmp_path, "other", records=RECORDS[20:40])
    assert default.prior_history == open_ledger(tmp_path, DELTA).history()  # not declared: counted anyway
    disjoint, spec, cfg2 = _plan(tmp_path, "other", records=RECORDS[20:40], overrides=("privacy.disjoint_data=true",))
    assert spec.prior_history == []
    _train(disjoint, cfg2)
    report = disjoint.report()
    assert report["disjoint_data"] is True and [m["run_id"] for m in report["mechanisms"]] == [disjoint.run_id]
    assert len(first.report()["mechanisms"]) == 2  # a run not declared disjoint composes with both


def test_two_runs_started_together_under_a_budget_for_one_the_second_is_refused(tmp_path, no_training):
    """Each passes the early check against the ledger as it opened it; the reservation before training is
    atomic (under the ledger's file lock: flock excludes every other open of the lock file, threads included),
    so the second sees the first's reservation and is refused before it trains."""
    planned = [_plan(tmp_path, f"run-{i}", eps=4.0, overrides=("privacy.total_epsilon_budget=4.5",)) for i in (0, 1)]
    barrier, outcome = threading.Barrier(2), {}

    def run(i: int) -> None:
        engine, _, cfg = planned[i]
        barrier.wait()
        try:
            _train(engine, cfg)
            outcome[i] = "trained"
        except LedgerError as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = [i for i in (0, 1) if outcome[i] == "trained"]
    assert len(trained) == 1 and "refused" in outcome[1 - trained[0]] and "> budget 4.5" in outcome[1 - trained[0]]
    assert no_training["started"] == [planned[trained[0]][0].run_id]  # the refused one never trained
    assert [m.run_id for m in open_ledger(tmp_path, DELTA).mechanisms] == no_training["started"]


def test_no_tolerance_over_the_budget(tmp_path):
    ledger = open_ledger(tmp_path, DELTA)
    planned = Mechanism("generator", calibrate_noise(4.0, DELTA, 0.02, 150), 0.02, 150)
    eps = check_budget(ledger, planned, None)
    assert check_budget(ledger, planned, eps) == eps
    with pytest.raises(LedgerError, match="refused"):
        check_budget(ledger, planned, eps * (1 - 1e-6))


def test_a_failed_run_keeps_its_reservation_counted(tmp_path, no_training):
    failed, _, cfg = _plan(tmp_path, "generator")
    no_training["fail"] = True
    with pytest.raises(RuntimeError, match="a worker died"):
        _train(failed, cfg)
    (entry,) = open_ledger(tmp_path, DELTA).mechanisms
    assert entry.state == "reserved" and entry.run_id == failed.run_id
    _, spec, _ = _plan(tmp_path, "next")
    assert spec.prior_history == [(entry.noise_multiplier, entry.sample_rate, entry.steps)]
    with pytest.raises(LedgerError, match="not a trained, published run"):
        failed.publish(tmp_path / "bundle", "generator", tmp_path, tmp_path / "staging", {})


def test_nothing_trained_with_the_noise_switched_off_is_published(tmp_path, no_training, monkeypatch):
    from ksg_ray.client.privacy.dp_sgd import TEST_ONLY_NO_NOISE_ENV

    engine, _, cfg = _plan(tmp_path, "generator")
    _train(engine, cfg)
    monkeypatch.setenv(TEST_ONLY_NO_NOISE_ENV, "1")
    with pytest.raises(LedgerError, match="switched the DP noise off"):
        engine.publish(tmp_path / "bundle", "generator", tmp_path, tmp_path / "staging", {})
    assert not (tmp_path / "bundle").exists()


def test_evaluation_only_runs_are_unpublished_and_never_counted(tmp_path, no_training):
    """The non-private baseline and the ε grid: recorded, never counted toward a bundle's ε or the budget, and
    never published."""
    published, _, cfg = _plan(tmp_path, "generator", overrides=("privacy.total_epsilon_budget=5",))
    _train(published, cfg)
    for run_name, eps in (("non_private", "inf"), ("dp_eps1", "1")):  # over the budget: not refused
        engine, spec, cfg2 = _plan(tmp_path, run_name, overrides=(f"privacy.target_epsilon={eps}",
                                                                    "privacy.publish=false",
                                                                    "privacy.total_epsilon_budget=5"))
        assert spec.prior_history == []
        _train(engine, cfg2)
        with pytest.raises(LedgerError, match="never leaves the client"):
            engine.publish(tmp_path / "bundle", "generator", tmp_path, tmp_path / "staging", {})
    ledger = open_ledger(tmp_path, DELTA)
    assert [(m.run_id, m.published) for m in ledger.mechanisms] == [
        (published.run_id, True), (ledger.mechanisms[1].run_id, False), (ledger.mechanisms[2].run_id, False)]
    alone = published.report()
    assert [m["run_id"] for m in alone["mechanisms"]] == [published.run_id] and alone["epsilon"] < 5
    _, spec, _ = _plan(tmp_path, "reward", name="reward", overrides=("privacy.total_epsilon_budget=40",))
    assert spec.prior_history == ledger.history() == [(m.noise_multiplier, m.sample_rate, m.steps)
                                                      for m in ledger.mechanisms[:1]]


def test_the_report_carries_each_mechanisms_own_n_and_no_fingerprint(tmp_path, no_training):
    from ksg_ray.bundle import _check_privacy

    gen, _, cfg = _plan(tmp_path, "generator")
    _train(gen, cfg)
    rew, _, cfg2 = _plan(tmp_path, "reward", records=RECORDS[:30], name="reward")
    _train(rew, cfg2)
    report = rew.report()
    assert [(m["name"], m["records"]) for m in report["mechanisms"]] == [("generator", 40), ("reward", 30)]
    assert "records" not in report and report["disjoint_data"] is False
    assert _check_privacy(report | {"adapters": {}}) == []  # the bundle's whitelist takes it
    text = json.dumps(report)
    ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert not any(fp in text for fps in ledger["record_sets"].values() for fp in fps)
    assert not any(set_id in text for set_id in ledger["record_sets"]) and "record_set" not in text


def test_two_jobs_saving_the_ledger_both_count(tmp_path):
    a, b = open_ledger(tmp_path, DELTA), open_ledger(tmp_path, DELTA)  # opened at the same time
    a.record(Mechanism("generator", 1.0, 0.1, 10, "generator:aaa"))
    b.record(Mechanism("reward", 1.0, 0.1, 10, "reward:bbb"))
    a.save()
    b.save()  # reloads under the lock and merges: a's run is kept
    assert sorted(m.key for m in open_ledger(tmp_path, DELTA).mechanisms) == ["generator:aaa", "reward:bbb"]


def test_a_reward_job_with_another_ledger_is_refused_with_the_numbers(tmp_path):
    from ksg_ray.client.privacy.ledger import check_recorded

    generator_dir, reward_dir = tmp_path / "gen", tmp_path / "rew"
    gen = open_ledger(generator_dir, DELTA)
    gen.record(Mechanism("generator", 0.8, 0.2, 25, "generator:abc"))
    released = privacy_report(gen)["mechanisms"]
    check_recorded(gen, released, "the generator bundle's privacy.json")  # the generator's own ledger: fine
    with pytest.raises(ValueError, match=r"generator:abc \(σ=0\.8000, q=0\.2000, 25 steps\) is not in this ledger"):
        check_recorded(open_ledger(reward_dir, DELTA), released, "the generator bundle's privacy.json")
    other = open_ledger(tmp_path / "other", DELTA)
    other.record(Mechanism("generator", 0.9, 0.2, 25, "generator:abc"))
    with pytest.raises(ValueError, match="the ledger says σ=0.9"):
        check_recorded(other, released, "the generator bundle's privacy.json")


def test_privacy_show_lists_every_run_and_the_composed_epsilon(tmp_path, capsys):
    from ksg_ray import cli

    runs = [Mechanism("generator", calibrate_noise(4.0, DELTA, 0.02, 150), 0.02, 150, "generator:one"),
            Mechanism("generator", calibrate_noise(2.0, DELTA, 0.05, 60), 0.05, 60, "generator:two"),
            Mechanism("reward", calibrate_noise(4.0, DELTA, 0.04, 50), 0.04, 50, "reward:three")]
    ledger = open_ledger(tmp_path, DELTA)
    for m in runs:
        ledger.record(m)
    ledger.save()
    assert cli.main(["privacy", "show", str(tmp_path), "--budget", "20"]) == 0
    out = capsys.readouterr().out
    assert all(m.run_id in out for m in runs)
    shown = float(out.split("composed    ε=")[1].split()[0])
    independent = pld.PLDAccountant().compose(dpa.ComposedDpEvent([_event(m) for m in runs])).get_epsilon(DELTA)
    assert independent <= shown <= 1.01 * independent  # PRV's upper bound: never below PLD
    assert f"{20 - shown:.3f} left" in out


def test_a_run_can_target_the_total_epsilon_of_everything_spent_on_the_records(tmp_path, no_training):
    """privacy.target_scope=total: the reward model's σ is chosen so that the generator and it compose to the
    target (a bundle at the same ε as one DP fine-tune), as an independent accountant computes it."""
    generator, gen_spec, cfg = _plan(tmp_path, "generator", eps=4.0)
    _train(generator, cfg)
    alone = _plan(tmp_path, "alone", eps=6.0, name="reward")[1]
    reward, spec, cfg = _plan(tmp_path, "reward", eps=6.0, name="reward", overrides=("privacy.target_scope=total",))
    assert spec.noise_multiplier > alone.noise_multiplier  # less is left for it than for a run alone
    _train(reward, cfg)
    events = [_event(Mechanism(s.run_id, s.noise_multiplier, s.sample_rate, s.steps)) for s in (gen_spec, spec)]
    independent = pld.PLDAccountant().compose(dpa.ComposedDpEvent(events)).get_epsilon(DELTA)
    assert 5.85 <= independent <= open_ledger(tmp_path, DELTA).epsilon() <= 6.0
    with pytest.raises(ValueError, match=r"already spent ε=.* of the total target ε=3\.0"):
        _plan(tmp_path, "more", eps=3.0, name="reward", overrides=("privacy.target_scope=total",))
