"""`ksg audit one-run`: the one-run ε lower bound (Steinke, Nasr & Jagielski 2023) against two public
implementations, and the audit end to end on the tiny model: it finds the memorisation at ε = ∞, catches a
planted bug (noise off while the accountant still claims ε = 1), and stays below the claim with the real noise.

The canary game of the end-to-end tests: 40 canaries (random vocabulary words as question and answer), about
half of them trained on; LoRA also on `lm_head`, whose rows give each secret token a parameter of its own (the
tiny random model's q/v adapters alone barely move any canary's loss in 3 steps), and a batch near the whole
set so that 3 steps see every member. With k = 10 guesses on each side the bound is at most 1.821 (20/20 right).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksg_ray import cli
from ksg_ray.audit.one_run import (
    OneRunAuditConfig,
    count_correct,
    epsilon_lower_bound,
    format_result,
    guess,
    p_value,
    recipe_argv,
)
from ksg_ray.common.config import KsgConfigError, load_config

# (m, r, v, δ, confidence) -> ε lower bound, computed by running google-deepmind/jax_privacy 2.0.0
# `jax_privacy/auditing.py` `_epsilon_one_run(0, m, r, v, 1 - confidence, δ)` (brentq, xtol 1e-6), and, at δ = 0,
# ubc-systopia/panoramia-privacy-measurement@6541bbb `O1_Steinke_Code/o1_audit.py` `get_eps_audit(m, r, v,
# 1 - confidence, 0)` (the paper's own code: 30 bisection steps; it leaves out the δ term).
JAX_PRIVACY = [
    (64, 20, 20, 1e-5, 0.95, 1.8207202548162562),
    (64, 20, 19, 1e-5, 0.95, 1.2872164862132855),
    (64, 20, 15, 1e-5, 0.95, 0.17736925764570166),
    (32, 16, 16, 0.0, 0.95, 1.5803230526021474),
    (32, 16, 14, 1e-3, 0.95, 0.5879392324750683),
    (1000, 100, 90, 1e-5, 0.95, 1.6261436787042223),
    (1000, 200, 150, 1e-6, 0.99, 0.7153702163421263),
    (100, 10, 5, 1e-5, 0.95, 0.0),
    (10000, 1000, 800, 1e-5, 0.95, 1.2507917769068924),
    (1000, 100, 95, 1e-3, 0.95, 0.5943136918269514),  # a large 2mδ term: 2.172 at δ = 0
    (64, 64, 64, 0.0, 0.95, 3.0381989312744606),
    (1000, 100, 95, 1e-2, 0.95, 0.0),
]
PANORAMIA_DELTA0 = [
    (64, 20, 20, 0.95, 1.8227156046777964),
    (64, 20, 19, 0.95, 1.288503808900714),
    (32, 16, 14, 0.95, 0.6462938310578465),
    (1000, 100, 90, 0.95, 1.630823191255331),
    (1000, 200, 150, 0.99, 0.7158114742487669),
    (10000, 1000, 800, 0.95, 1.2543303575366735),
    (1000, 100, 95, 0.95, 2.172434041276574),
    (64, 64, 64, 0.95, 3.038198933005333),
]
# jax_privacy `_one_run_p_value(m, r, v, eps, δ)`
JAX_P_VALUES = [
    (64, 20, 19, 1.0, 1e-5, 0.01607096491580782),
    (32, 16, 14, 0.5, 1e-3, 0.037440523241206156),
    (1000, 100, 95, 0.5, 1e-3, 0.04718861712838528),
    (1000, 200, 150, 1.0, 1e-6, 0.3033112080909583),
    (10000, 1000, 800, 1.0, 1e-5, 0.0020859885157612657),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence", "expected"), JAX_PRIVACY)
def test_bound_agrees_with_jax_privacy(m, r, v, delta, confidence, expected):
    assert epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(("m", "r", "v", "confidence", "expected"), PANORAMIA_DELTA0)
def test_bound_agrees_with_the_papers_code_at_delta_0(m, r, v, confidence, expected):
    assert epsilon_lower_bound(m, r, v, 0.0, confidence) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta", "expected"), JAX_P_VALUES)
def test_p_value_agrees_with_jax_privacy(m, r, v, eps, delta, expected):
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_bound_grows_with_correct_guesses_and_rejects_bad_counts():
    bounds = [epsilon_lower_bound(40, 20, v, 1e-5) for v in range(21)]
    assert bounds[:11] == [0.0] * 11  # no better than a coin
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False)) and bounds[-1] > 1.8
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_guesses_are_the_top_and_bottom_k():
    scores = np.array([0.9, -1.0, 0.5, 0.1, 2.0, -0.3])
    g = guess(scores, 2)
    assert g.tolist() == [1, -1, 0, 0, 1, -1]
    assert count_correct(g, np.array([1, 0, 1, 0, 0, 1], dtype=bool)) == (4, 2)


def test_config_takes_the_generators_keys_and_checks_k():
    cfg = load_config(OneRunAuditConfig, "configs/dp_finetune.yaml", ["audit.canaries=64", "audit.k=12"])
    assert (cfg.audit.canaries, cfg.audit.k, cfg.model.name) == (64, 12, "smollm2-135m")
    with pytest.raises(KsgConfigError, match="audit.k=20"):
        load_config(OneRunAuditConfig, None, ["audit.canaries=30", "audit.k=20"])


def test_cli_parses_audit_one_run():
    args = cli.parse_args(["audit", "one-run", "audit.k=3", "configs/dp_finetune.yaml", "audit.canaries=8"])
    assert (args.command, args.audit_command) == ("audit", "one-run")
    assert recipe_argv(args) == ["--config", "configs/dp_finetune.yaml", "audit.k=3", "audit.canaries=8"]
    with pytest.raises(KsgConfigError, match="one config file at most"):
        recipe_argv(cli.parse_args(["audit", "one-run", "a.yaml", "b.yaml"]))


GAME = ["model.name=tiny-random", "data.max_seq_len=64", "lora.target_modules=[q_proj,v_proj,lm_head]",
        "audit.canaries=40", "audit.k=10", "audit.seed=0", "train.expected_batch_size=16", "train.max_steps=3",
        "train.epochs=3", "train.lr=0.01", "train.checkpoint_every=100", "scaling.num_workers=0",
        "privacy.sampling_seed=0"]


def _audit(tmp_path: Path, *overrides: str) -> dict:
    from ksg_ray.jobs import audit_one_run

    return audit_one_run.main([*GAME, f"run.output_dir={tmp_path / 'runs'}",
                               f"privacy.ledger_dir={tmp_path / 'ledger'}", *overrides])


@pytest.mark.e2e
def test_audit_finds_the_memorisation_at_epsilon_inf(ray_cluster, tmp_path, capsys):
    result = _audit(tmp_path, "privacy.target_epsilon=inf")
    out = capsys.readouterr().out
    assert result["claimed_epsilon"] == "inf" and result["noise_multiplier"] == 0.0
    assert result["epsilon_lower_bound"] >= 1.0, format_result(result)
    # a line of its own (a library may log to stdout first: DeepSpeed's logger writes there)
    bound = f"epsilon lower bound: {result['epsilon_lower_bound']:.3f} (claimed: inf, m=40, k=10, confidence 0.95"
    assert any(line.startswith(bound) for line in out.splitlines()), out[-2000:]
    written = json.loads((tmp_path / "runs" / "audit" / "one_run.json").read_text())
    assert written["epsilon_lower_bound"] == result["epsilon_lower_bound"] and written["trained_on"] == "canaries"
    assert len(written["scores"]) == len(written["included"]) == 40 and sum(written["included"]) == written["members"]
    # canaries alone: not a run on the private records, so the client's ledger is untouched; the run is
    # accounted beside its canaries
    assert "not a run on the private records" in out and not (tmp_path / "ledger").exists()
    assert (tmp_path / "runs" / "audit" / "one_run" / "ledger" / "privacy_ledger.json").is_file()
    with pytest.raises(KsgConfigError, match="has finished"):  # a finished audit is never silently redone
        _audit(tmp_path, "privacy.target_epsilon=inf")


@pytest.mark.e2e
def test_audit_catches_noise_switched_off_while_epsilon_1_is_claimed(tmp_path):
    """The planted bug: DP-SGD adds no noise (a test-only switch in dp_sgd.py) while σ, and so the accountant's ε,
    are those of ε = 1. The audit runs as its own `ksg` process, so that its Ray workers see the switch."""
    from ksg_ray.client.privacy.dp_sgd import TEST_ONLY_NO_NOISE_ENV

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {TEST_ONLY_NO_NOISE_ENV: "1"}
    done = subprocess.run([sys.executable, "-m", "ksg_ray.cli", "audit", "one-run", *GAME, "privacy.target_epsilon=1",
                           f"run.output_dir={tmp_path / 'runs'}", f"privacy.ledger_dir={tmp_path / 'ledger'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "audit" / "one_run.json").read_text())
    assert result["noise_multiplier"] > 1 and 0.98 <= result["claimed_epsilon"] <= 1.0
    assert result["epsilon_lower_bound"] > 1.0 > result["claimed_epsilon"], done.stdout
    assert "epsilon lower bound: " in done.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(("epsilon", "records"), [(8, True), (1, False)])
def test_audit_stays_below_the_claim_with_the_real_noise(ray_cluster, tmp_path, epsilon, records):
    """At ε = 8 the audit also trains on 8 private records: then it is a run on them, in the client's ledger."""
    result = _audit(tmp_path, f"privacy.target_epsilon={epsilon}", f"audit.records={str(records).lower()}",
                    "data.limit=8")
    assert math.isfinite(result["claimed_epsilon"]) and result["claimed_epsilon"] == pytest.approx(epsilon, rel=0.02)
    assert result["epsilon_lower_bound"] <= result["claimed_epsilon"], format_result(result)
    assert result["trained_on"] == ("records+canaries" if records else "canaries")
    if records:
        runs = json.loads((tmp_path / "ledger" / "privacy_ledger.json").read_text())["runs"]
        assert len(runs) == 1 and runs[0]["records"] == 8 + result["members"]
        assert (runs[0]["noise_multiplier"], runs[0]["sample_rate"], runs[0]["steps"]) == (
            result["noise_multiplier"], result["sample_rate"], result["steps"])
    else:
        assert not (tmp_path / "ledger").exists()
