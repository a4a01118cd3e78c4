"""CLIENT SIDE — `PrivacyEngine`: the one object that holds a DP job's privacy state, as Opacus' engine does.

Every DP job on the client (the generator, the reward model) goes through the same calls, in this order:

    engine = PrivacyEngine(cfg.privacy, cfg.run.output_dir, cfg.data.path)   # opens the records' ledger
    spec = engine.make_private("generator", n, cfg.train, cfg.scaling, cfg.run)  # σ for the whole run, budget
    ckpt, metrics = engine.fit(task, cfg.scaling, cfg.run)                   # DP-SGD on Ray Train, then recorded
    bundle, report = engine.publish(bundle_dir, "generator", ckpt / "model", staging, model_ref)

so the ledger logic (what was spent on these records, what the bundle reports) lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ksg_ray.bundle import publish_component
from ksg_ray.client.dp_trainer import DPRunSpec, DPTask, fit_dp, plan_dp_run, read_run_id
from ksg_ray.client.privacy.accountant import Mechanism
from ksg_ray.client.privacy.ledger import PrivacyLedger, check_recorded, open_ledger, privacy_report

__all__ = ["PrivacyEngine"]


class PrivacyEngine:
    """The ledger of one private dataset plus the DP run being planned, trained and published on it.

    Args:
        privacy: the job's `privacy` config section (ε target, δ, clip norm, accountant, budget, seeds).
        output_dir: the client's run directory; the ledger is `<output_dir>/privacy_ledger.json`.
        data_path: the private records (their fingerprint keys the ledger).
    """

    def __init__(self, privacy: Any, output_dir: str | Path, data_path: str):
        self.privacy = privacy
        self.ledger: PrivacyLedger = open_ledger(output_dir, data_path, privacy.delta)
        self.name: str | None = None
        self.run_id = ""
        self.spec: DPRunSpec | None = None

    def make_private(self, name: str, num_records: int, train: Any, scaling: Any, run: Any) -> DPRunSpec:
        """Fix the run's numbers (q, steps, σ calibrated for the whole run) and check δ < 1/N and the budget
        against everything already spent on these records, before anything is generated or trained.

        The run's ledger key is read from `<run.output_dir>/<run.name>` when it is a resume, else drawn fresh:
        every run but a resume counts.

        Raises:
            ValueError: δ ≥ 1/N, ε unreachable, or the composed ε would exceed `privacy.total_epsilon_budget`.
        """
        self.name = name
        self.run_id = read_run_id(Path(run.output_dir) / run.name, name)
        self.spec = plan_dp_run(name, num_records, self.privacy, train, scaling, self.ledger, self.run_id)
        return self.spec

    def require_recorded(self, released: dict[str, Any], source: str) -> None:
        """Refuse (ValueError, with the numbers) unless every mechanism of a released `privacy.json` is in this
        ledger: what this job publishes must compose with everything that was spent on these records."""
        check_recorded(self.ledger, list(released.get("mechanisms", [])), source)

    def fit(self, task: DPTask, scaling: Any, run: Any) -> tuple[Path, dict[str, Any]]:
        """Train `task` under the planned spec on Ray Train (resumes a run that died), then record the
        mechanism in the ledger; returns (final checkpoint dir, last metrics)."""
        spec = self._planned()
        ckpt, metrics = fit_dp(task, spec, num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                               cpus_per_worker=scaling.cpus_per_worker, output_dir=run.output_dir, name=run.name,
                               max_failures=run.max_failures, run_id=self.run_id)
        self.ledger.record(Mechanism(self.name, spec.noise_multiplier, spec.sample_rate, spec.steps, self.run_id))
        self.ledger.save()
        return ckpt, metrics

    def mark_not_dp(self, what: str) -> None:
        """Record that something read the private data without DP (the bundle then says so in `not_dp`)."""
        self.ledger.mark_not_dp(what)

    def epsilon(self, accountant: str = "prv") -> float:
        """ε composed over every mechanism recorded on these records so far."""
        return self.ledger.epsilon(accountant)

    def report(self, **extra: Any) -> dict[str, Any]:
        """The bundle's `privacy.json`: every mechanism, the composed ε, every non-DP use of the data."""
        return privacy_report(self.ledger, **extra)

    def publish(self, bundle_dir: Path, component: str, adapter_dir: Path, staging: Path, model_ref: dict,
                **extra: Any) -> tuple[Path, dict[str, Any]]:
        """Put the trained adapter into the transfer bundle with the composed privacy report; returns
        (bundle dir, report)."""
        report = self.report(**extra)
        bundle = publish_component(bundle_dir, component, adapter_dir, privacy=report, staging=staging,
                                   model_ref=model_ref)
        return bundle, report

    def _planned(self) -> DPRunSpec:
        if self.spec is None or self.name is None:
            raise RuntimeError("PrivacyEngine.fit before make_private: plan the run (and check the budget) first")
        return self.spec
