"""`ksg dp-train` end to end on a tiny model: bundle, accounting checked by an independent accountant, bad input."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from ksg_ray.bundle import verify_bundle
from ksg_ray.common.config import KsgConfigError
from ksg_ray.jobs import dp_finetune

pytestmark = pytest.mark.e2e  # real Ray clusters and trainings: the long tests, at their smallest settings

SMALL = ["model.name=tiny-random", "data.limit=24", "data.max_seq_len=64", "train.expected_batch_size=4",
         "train.max_steps=6", "train.checkpoint_every=3", "scaling.num_workers=2", "privacy.delta=1e-3"]


@pytest.fixture(scope="module")
def trained(client_bundle):
    """The DP generator of the shared tiny client run (`conftest.client_bundle`: `ksg dp-train` with 2 Ray Train
    workers, then `ksg dp-reward` into the same bundle) and its dp-train summary."""
    tmp, _, _ = client_bundle
    return tmp, json.loads((tmp / "generator_summary.json").read_text())


def test_bundle_verifies_and_holds_only_the_model(trained):
    out, summary = trained
    manifest = verify_bundle(out / "bundle")
    names = set(manifest["files"])
    assert "generator/adapter_model.safetensors" in names and "privacy.json" in names
    assert not any(n.endswith((".jsonl", ".parquet", ".txt", ".pt")) for n in names)


def test_reported_epsilon_matches_an_independent_accountant(trained):
    out, summary = trained
    privacy = json.loads((out / "bundle" / "privacy.json").read_text())
    mech = privacy["mechanisms"][0]  # the generator's; the reward model's follows (composed: test_privacy_ledger)
    assert mech["name"] == "generator" and mech["steps"] == summary["steps"] == 3 and mech["noise_multiplier"] > 0
    assert (mech["noise_multiplier"], mech["sample_rate"]) == (summary["noise_multiplier"], summary["sample_rate"])
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(mech["sample_rate"], dpa.GaussianDpEvent(mech["noise_multiplier"])), mech["steps"])
    pld_eps = pld.PLDAccountant().compose(event).get_epsilon(privacy["delta"])
    rdp_eps = rdp.RdpAccountant().compose(event).get_epsilon(privacy["delta"])
    eps = float(summary["epsilon"])  # what dp-train reported for the generator alone
    assert pld_eps <= eps <= 1.01 * pld_eps  # PRV is an upper bound: never below Google's PLD accountant
    assert float(summary["epsilon_rdp"]) == pytest.approx(rdp_eps, rel=0.01)
    assert eps == pytest.approx(8.0, rel=0.02)  # σ was calibrated for the whole run to the target


def test_training_moved_the_adapter(trained):
    from safetensors.torch import load_file

    out, _ = trained
    sd = load_file(str(out / "bundle" / "generator" / "adapter_model.safetensors"))
    b_norm = math.sqrt(sum(float((v.float() ** 2).sum()) for k, v in sd.items() if "lora_B" in k))
    assert b_norm > 0  # LoRA B starts at exactly zero


@pytest.mark.parametrize("override,needle", [
    ("privacy.target_epsilon=-1", "target_epsilon"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("train.epochs=0", "train.epochs"),
    ("scaling.strategy=fsdp", "scaling.strategy"),
    ("nonsense.key=1", "nonsense"),
])
def test_bad_config_is_named(override, needle):
    with pytest.raises(KsgConfigError, match=needle):
        dp_finetune.main([override])


def test_bad_data_fails_before_training_and_leaves_no_bundle(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "", "input": "q", "output": "a"}\n{"instruction": "", "input": "q"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        dp_finetune.main(SMALL + [f"data.path={bad}", f"run.output_dir={tmp_path}", f"run.bundle_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "b").exists()


def test_unreachable_delta_and_epsilon_are_refused(tmp_path):
    common = SMALL + [f"run.output_dir={tmp_path}", f"run.bundle_dir={tmp_path / 'b'}"]
    with pytest.raises(ValueError, match="1/N"):
        dp_finetune.main(common + ["privacy.delta=0.09"])
    with pytest.raises(ValueError, match="cannot reach"):
        dp_finetune.main(common + ["privacy.target_epsilon=1e-6"])
    assert not (tmp_path / "b").exists()
