"""The privacy ledger: every DP mechanism run on one private dataset, persisted on the client, and its ε.

Two models trained on the same records (the generator, the reward model) compose: the ledger keeps each run's
(σ, q, steps) and reports ε of the concatenated history, computed by the PRV accountant (RDP beside it as a
cross-check). A run that would push the composed ε over the budget is refused before it starts.
The ledger lives next to the client's runs (`<output_dir>/privacy_ledger.json`), keyed by a fingerprint of the
data, so a second job on the same records cannot forget the first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ksg_ray.client.privacy.accountant import Mechanism, epsilon_for
from ksg_ray.common.jsonl import write_json_atomic

__all__ = ["PrivacyLedger", "check_budget", "check_delta", "data_fingerprint", "open_ledger", "privacy_report"]

LEDGER_FILE = "privacy_ledger.json"


class PrivacyLedger:
    """Every mechanism run on one dataset (by name: a resumed or rerun job replaces its own entry)."""

    def __init__(self, delta: float, mechanisms: list[Mechanism] | None = None, not_dp: list[str] | None = None,
                 path: Path | None = None, fingerprint: str = ""):
        self.delta = delta
        self.mechanisms = list(mechanisms or [])
        self.not_dp = list(not_dp or [])
        self.path = path
        self.fingerprint = fingerprint

    def history(self, exclude: str | None = None) -> list[tuple[float, float, int]]:
        return [h for m in self.mechanisms if m.name != exclude for h in m.history()]

    def epsilon(self, accountant: str = "prv") -> float:
        return epsilon_for(self.history(), self.delta, accountant)

    def record(self, mechanism: Mechanism) -> None:
        self.mechanisms = [m for m in self.mechanisms if m.name != mechanism.name] + [mechanism]

    def mark_not_dp(self, what: str) -> None:
        """Record that something read the private data without DP (it voids the guarantee for the bundle)."""
        if what not in self.not_dp:
            self.not_dp.append(what)

    def save(self) -> None:
        assert self.path is not None, "ledger has no file"
        data = {"fingerprint": self.fingerprint, "delta": self.delta, "not_dp": self.not_dp,
                "mechanisms": [asdict(m) for m in self.mechanisms]}
        write_json_atomic(self.path, data)


def data_fingerprint(data_path: str) -> str:
    """sha256 of the data file (or the demo's name); the ledger belongs to exactly these records."""
    p = Path(data_path)
    if p.is_file():
        return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return f"name:{data_path}"


def open_ledger(output_dir: str | Path, data_path: str, delta: float) -> PrivacyLedger:
    """Load (or start) the ledger of `data_path` under `output_dir`.

    Raises:
        ValueError: the ledger belongs to other data, or was kept at another δ.
    """
    path = Path(output_dir) / LEDGER_FILE
    fingerprint = data_fingerprint(data_path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return PrivacyLedger(delta, path=path, fingerprint=fingerprint)
    data = json.loads(path.read_text())
    if data["fingerprint"] != fingerprint:
        raise ValueError(f"{path} is the privacy ledger of other data ({data['fingerprint']}); "
                         f"{data_path} is {fingerprint}. Use another run.output_dir for other data.")
    if data["delta"] != delta:
        raise ValueError(f"{path} accounts at δ={data['delta']}; this run asks δ={delta}: use the same δ")
    mechs = [Mechanism(**m) for m in data["mechanisms"]]
    return PrivacyLedger(delta, mechs, data.get("not_dp", []), path=path, fingerprint=fingerprint)


def check_delta(delta: float, num_records: int) -> None:
    """δ must be below 1/N, or "leak one record in the clear" would satisfy the guarantee."""
    if not delta < 1 / num_records:
        raise ValueError(f"privacy.delta={delta} must be < 1/N = {1 / num_records:.2e} for N={num_records} records")


def check_budget(ledger: PrivacyLedger, planned: Mechanism, budget: float | None, accountant: str = "prv") -> float:
    """Composed ε once `planned` joins the ledger; refuses (ValueError, before anything is trained) if it would
    exceed `budget` (None = no cap beyond each model's own target)."""
    eps = epsilon_for(ledger.history(exclude=planned.name) + planned.history(), ledger.delta, accountant)
    if budget is not None and eps > budget * 1.001:  # calibration tolerance
        spent = epsilon_for(ledger.history(exclude=planned.name), ledger.delta, accountant)
        raise ValueError(
            f"refused: training {planned.name!r} (σ={planned.noise_multiplier:.4f}, q={planned.sample_rate:.4f}, "
            f"{planned.steps} steps) would bring the composed ε on these records to {eps:.3f} > budget {budget} "
            f"(already spent by {[m.name for m in ledger.mechanisms if m.name != planned.name]}: ε={spent:.3f})"
        )
    return eps


def privacy_report(ledger: PrivacyLedger, **extra) -> dict:
    """The bundle's privacy.json: every mechanism, the composed ε, and every non-DP use of the data."""
    return {
        "epsilon": ledger.epsilon("prv"),
        "epsilon_rdp": ledger.epsilon("rdp"),
        "delta": ledger.delta,
        "accountant": "prv",
        "composition": "PRV accountant over the concatenated (σ, q, steps) history of all mechanisms",
        "mechanisms": [asdict(m) | {"mechanism": "poisson-subsampled-gaussian"} for m in ledger.mechanisms],
        "not_dp": list(ledger.not_dp),
        **extra,
    }
