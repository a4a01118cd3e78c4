"""CLIENT SIDE — `PrivacyEngine`: the one object that holds a DP job's privacy state, as Opacus' engine does.

Every DP job on the client (the generator, the reward model) goes through the same calls, in this order:

    engine = PrivacyEngine(cfg.privacy, records)                             # the client's ledger, these records
    spec = engine.make_private("generator", n, cfg.train, cfg.scaling, cfg.run)  # σ for the whole run, budget
    ckpt, metrics = engine.fit(task, cfg.scaling, cfg.run)                   # reserve, DP-SGD on Ray Train, settle
    bundle, report = engine.publish(bundle_dir, "generator", ckpt / "model", staging, model_ref)

(an evaluation-only run, `privacy.publish: false`, calls `engine.keep(...)` instead: its adapter stays on the
client), so the ledger logic (what was spent, what the bundle reports) lives here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ksg_ray.bundle import publish_component
from ksg_ray.client.dp_trainer import DPRunSpec, DPTask, fit_dp, plan_dp_run, run_identity
from ksg_ray.client.privacy.accountant import epsilon_for
from ksg_ray.client.privacy.dp_sgd import TEST_ONLY_NO_NOISE_ENV
from ksg_ray.client.privacy.ledger import (
    Entry,
    LedgerError,
    PrivacyLedger,
    check_budget,
    check_recorded,
    open_ledger,
    privacy_report,
)
from ksg_ray.common.records import Record

__all__ = ["PrivacyEngine"]

logger = logging.getLogger(__name__)


class PrivacyEngine:
    """The client's ledger, the records of this job, and the DP run being planned, trained and published on them.

    Args:
        privacy: the job's `privacy` config section (ε target, δ, clip norm, accountant, budget, seeds, ledger_dir,
            disjoint_data, publish).
        records: the private records this job reads (fingerprinted, so that runs sharing a record are found).
    """

    def __init__(self, privacy: Any, records: Sequence[Record]):
        self.privacy = privacy
        self.ledger: PrivacyLedger = open_ledger(privacy.ledger_dir, privacy.delta)
        self.record_set = self.ledger.add_records(records)
        self.entry: Entry | None = None
        self.spec: DPRunSpec | None = None

    @property
    def run_id(self) -> str:
        return self.entry.run_id if self.entry else ""

    def make_private(self, name: str, num_records: int, train: Any, scaling: Any, run: Any) -> DPRunSpec:
        """Fix the run's numbers (q, steps, σ calibrated for the whole run) and check δ < 1/N and the budget
        against everything already spent or reserved, before anything is generated or trained. `fit` checks the
        budget again, atomically, when it reserves it.

        The run keeps the id in `<run.output_dir>/<run.name>` only when it resumes from a checkpoint there;
        otherwise it gets a new one: every run from step 0 counts.

        Raises:
            ValueError: δ ≥ 1/N, ε unreachable, or the composed ε would exceed `privacy.total_epsilon_budget`.
        """
        p = self.privacy
        run_id, resume = run_identity(Path(run.output_dir) / run.name, name)
        prior = self.ledger.history(self.record_set, p.disjoint_data, exclude=run_id) if p.publish else []
        self.spec = plan_dp_run(num_records, p, train, scaling, run_id=run_id, resume=resume, prior_history=prior)
        self.entry = Entry(name, self.spec.noise_multiplier, self.spec.sample_rate, self.spec.steps, run_id,
                           num_records, published=p.publish, record_set=self.record_set, disjoint_data=p.disjoint_data)
        check_budget(self.ledger, self.entry, p.total_epsilon_budget, p.accountant)
        return self.spec

    def require_recorded(self, released: dict[str, Any], source: str) -> None:
        """Refuse (ValueError, with the numbers) unless every mechanism of a released `privacy.json` is in this
        ledger: what this job publishes must compose with everything that was spent on these records."""
        check_recorded(self.ledger, list(released.get("mechanisms", [])), source)

    def fit(self, task: DPTask, scaling: Any, run: Any) -> tuple[Path, dict[str, Any]]:
        """Reserve the run's budget (atomically, under the ledger's lock), train `task` under the planned spec on
        Ray Train (resumes a run that died), then settle the reservation; returns (final checkpoint dir, last
        metrics). A run that fails keeps its reservation counted (conservative: it may have spent part of it)."""
        spec, entry = self._planned()
        self.ledger.reserve(entry, self.privacy.total_epsilon_budget, self.privacy.accountant)
        try:
            ckpt, metrics = fit_dp(task, spec, scaling=scaling, output_dir=run.output_dir, name=run.name,
                                   max_failures=run.max_failures)
        except BaseException:
            logger.warning("run %s failed: its reservation stays in %s and is counted", entry.key, self.ledger.path)
            raise
        self.ledger.settle(entry.key)
        return ckpt, metrics

    def mark_not_dp(self, what: str) -> None:
        """Record that something read the private data without DP (the bundle then says so in `not_dp`)."""
        self.ledger.mark_not_dp(what)

    def epsilon(self, accountant: str = "prv") -> float:
        """ε composed over every published run this job's run composes with (the ledger as it is now)."""
        self.ledger.refresh()
        return self.ledger.epsilon(accountant, self.record_set, self.privacy.disjoint_data)

    def report(self, **extra: Any) -> dict[str, Any]:
        """The bundle's `privacy.json`, from the ledger as it is now: every mechanism, the composed ε, every non-DP
        use of the data."""
        self.ledger.refresh()
        return privacy_report(self.ledger, self.record_set, self.privacy.disjoint_data, **extra)

    def publish(self, bundle_dir: Path, component: str, adapter_dir: Path, staging: Path, model_ref: dict,
                **extra: Any) -> tuple[Path, dict[str, Any]]:
        """Put the trained adapter into the transfer bundle with the composed privacy report; returns
        (bundle dir, report).

        Raises:
            LedgerError: the run is evaluation-only (`privacy.publish: false`), has not been trained, or the
                test-only switch that drops the noise is set.
        """
        if os.environ.get(TEST_ONLY_NO_NOISE_ENV) == "1":
            raise LedgerError(f"{TEST_ONLY_NO_NOISE_ENV}=1 switched the DP noise off (a test-only planted bug): "
                              "nothing trained this way may leave the client")
        _, entry = self._planned()
        mine = next((m for m in self.ledger.mechanisms if m.key == entry.key), None)
        if not entry.published or mine is None or mine.state != "trained":
            raise LedgerError(f"run {entry.key} is not a trained, published run of the ledger {self.ledger.path}: "
                              "an evaluation-only run (privacy.publish=false) never leaves the client")
        report = self.report(**extra)
        bundle = publish_component(bundle_dir, component, adapter_dir, privacy=report, staging=staging,
                                   model_ref=model_ref)
        return bundle, report

    def keep(self, adapter_dir: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
        """An evaluation-only run's adapter, copied to `dest` on the client (never a bundle); returns (dest, its
        own ε: it is unpublished, so it composes with nothing)."""
        _, entry = self._planned()
        dest, tmp = Path(dest), Path(dest).with_name(f".{Path(dest).name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(adapter_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # whole or absent
        delta = self.ledger.delta
        return dest, {"epsilon": epsilon_for(entry.history(), delta), "delta": delta, "published": False,
                      "epsilon_rdp": epsilon_for(entry.history(), delta, "rdp")}

    def _planned(self) -> tuple[DPRunSpec, Entry]:
        if self.spec is None or self.entry is None:
            raise RuntimeError("PrivacyEngine.fit before make_private: plan the run (and check the budget) first")
        return self.spec, self.entry
