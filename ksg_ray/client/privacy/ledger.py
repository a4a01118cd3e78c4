"""CLIENT SIDE — the privacy ledger: every DP run on one private dataset, persisted on the client, and its ε.

Models trained on the same records compose: the ledger keeps each run's (σ, q, steps) and reports ε of the
concatenated history, computed by the PRV accountant (RDP beside it as a cross-check). A run that would push the
composed ε over the budget is refused before it starts.

One entry per *run*, keyed by its run id (`Mechanism.run_id`: the run's kind and a nonce drawn when it started
fresh, kept in its `dp_run.json`). Only a resume of the same run replaces its entry; a second run on the same
records, under another name or after its directory was deleted, is another entry and is counted again.
The ledger lives next to the client's runs (`<output_dir>/privacy_ledger.json`), keyed by a fingerprint of the
data, and is written under a file lock with reload-and-merge, so two jobs writing at once both count.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ksg_ray.bundle import COMPOSITION
from ksg_ray.client.privacy.accountant import Mechanism, epsilon_for
from ksg_ray.common.errors import KsgError
from ksg_ray.common.jsonl import write_json_atomic

__all__ = ["LedgerError", "PrivacyLedger", "add_privacy_args", "check_budget", "check_delta", "check_recorded",
           "data_fingerprint", "open_ledger", "privacy_report", "run_privacy", "show_ledger"]

LEDGER_FILE = "privacy_ledger.json"


class LedgerError(KsgError, ValueError):
    """A DP run the ledger refuses: other data or another δ, δ ≥ 1/N, over the budget, or a bundle it lacks."""


class PrivacyLedger:
    """Every DP run on one dataset (a resumed run replaces its own entry; any other run appends)."""

    def __init__(self, delta: float, mechanisms: list[Mechanism] | None = None, not_dp: list[str] | None = None,
                 path: Path | None = None, fingerprint: str = ""):
        self.delta = delta
        self.mechanisms = list(mechanisms or [])
        self.not_dp = list(not_dp or [])
        self.path = path
        self.fingerprint = fingerprint

    def history(self, exclude: str | None = None) -> list[tuple[float, float, int]]:
        """The composed (σ, q, steps) history, without the run whose key is `exclude` (the one being resumed)."""
        return [h for m in self.mechanisms if m.key != exclude for h in m.history()]

    def epsilon(self, accountant: str = "prv") -> float:
        return epsilon_for(self.history(), self.delta, accountant)

    def record(self, mechanism: Mechanism) -> None:
        """Add a run; a run with the same key (a resume of it) is replaced, never counted twice."""
        self.mechanisms = [m for m in self.mechanisms if m.key != mechanism.key] + [mechanism]

    def mark_not_dp(self, what: str) -> None:
        """Record that something read the private data without DP (it voids the guarantee for the bundle)."""
        if what not in self.not_dp:
            self.not_dp.append(what)

    def save(self) -> None:
        """Write under the ledger's lock, merged with what other jobs wrote since this ledger was read."""
        assert self.path is not None, "ledger has no file"
        with _locked(self.path):
            if self.path.exists():
                on_disk = _read(self.path)
                mine = {m.key for m in self.mechanisms}
                self.mechanisms = [m for m in on_disk["mechanisms"] if m.key not in mine] + self.mechanisms
                self.not_dp = list(dict.fromkeys(on_disk["not_dp"] + self.not_dp))
            data = {"fingerprint": self.fingerprint, "delta": self.delta, "not_dp": self.not_dp,
                    "mechanisms": [asdict(m) for m in self.mechanisms]}
            write_json_atomic(self.path, data)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data | {"mechanisms": [Mechanism(**m) for m in data["mechanisms"]], "not_dp": data.get("not_dp", [])}


def data_fingerprint(data_path: str) -> str:
    """sha256 of the data file (or the demo's name); the ledger belongs to exactly these records."""
    p = Path(data_path)
    if p.is_file():
        return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return f"name:{data_path}"


def open_ledger(output_dir: str | Path, data_path: str, delta: float) -> PrivacyLedger:
    """Load (or start) the ledger of `data_path` under `output_dir`.

    Raises:
        LedgerError: the ledger belongs to other data, or was kept at another δ.
    """
    path = Path(output_dir) / LEDGER_FILE
    fingerprint = data_fingerprint(data_path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return PrivacyLedger(delta, path=path, fingerprint=fingerprint)
    data = _read(path)
    if data["fingerprint"] != fingerprint:
        raise LedgerError(f"{path} is the privacy ledger of other data ({data['fingerprint']}); "
                         f"{data_path} is {fingerprint}. Use another run.output_dir for other data.")
    if data["delta"] != delta:
        raise LedgerError(f"{path} accounts at δ={data['delta']}; this run asks δ={delta}: use the same δ")
    return PrivacyLedger(delta, data["mechanisms"], data["not_dp"], path=path, fingerprint=fingerprint)


def check_delta(delta: float, num_records: int) -> None:
    """δ must be below 1/N, or "leak one record in the clear" would satisfy the guarantee."""
    if not delta < 1 / num_records:
        raise LedgerError(f"privacy.delta={delta} must be < 1/N = {1 / num_records:.2e} for N={num_records} records")


def check_budget(ledger: PrivacyLedger, planned: Mechanism, budget: float | None, accountant: str = "prv") -> float:
    """Composed ε once `planned` joins the ledger; refuses (LedgerError, before anything is trained) if it would
    exceed `budget` (None = no cap beyond each model's own target)."""
    eps = epsilon_for(ledger.history(exclude=planned.key) + planned.history(), ledger.delta, accountant)
    if budget is not None and eps > budget * 1.001:  # calibration tolerance
        spent = epsilon_for(ledger.history(exclude=planned.key), ledger.delta, accountant)
        raise LedgerError(
            f"refused: training {planned.name!r} (σ={planned.noise_multiplier:.4f}, q={planned.sample_rate:.4f}, "
            f"{planned.steps} steps) would bring the composed ε on these records to {eps:.3f} > budget {budget} "
            f"(already spent by {[m.name for m in ledger.mechanisms if m.key != planned.key]}: ε={spent:.3f})"
        )
    return eps


def check_recorded(ledger: PrivacyLedger, released: list[dict], source: str) -> None:
    """Every mechanism a bundle's `privacy.json` lists must be in this ledger, with the same numbers: a reward
    model composed against a ledger that lacks the generator would under-report ε.

    Raises:
        LedgerError: naming each missing or disagreeing mechanism and where the ledger is.
    """
    mine = {m.key: m for m in ledger.mechanisms}
    problems = []
    for entry in released:
        m = Mechanism(**{k: entry[k] for k in ("name", "noise_multiplier", "sample_rate", "steps")},
                      run_id=entry.get("run_id", ""))
        have = mine.get(m.key)
        if have is None:
            problems.append(f"{m.key} (σ={m.noise_multiplier:.4f}, q={m.sample_rate:.4f}, {m.steps} steps) is not in "
                            "this ledger")
        elif (have.noise_multiplier, have.sample_rate, have.steps) != (m.noise_multiplier, m.sample_rate, m.steps):
            problems.append(f"{m.key}: {source} says σ={m.noise_multiplier}, q={m.sample_rate}, {m.steps} steps; "
                            f"the ledger says σ={have.noise_multiplier}, q={have.sample_rate}, {have.steps} steps")
    if problems:
        raise LedgerError(f"refused: {source} accounts for runs that the ledger {ledger.path} does not: "
                         + "; ".join(problems) + ". Run this job with the generator's run.output_dir (its ledger).")


def privacy_report(ledger: PrivacyLedger, **extra) -> dict:
    """The bundle's privacy.json: every mechanism, the composed ε, and every non-DP use of the data."""
    return {
        "epsilon": ledger.epsilon("prv"),
        "epsilon_rdp": ledger.epsilon("rdp"),
        "delta": ledger.delta,
        "accountant": "prv",
        "composition": COMPOSITION,
        "mechanisms": [asdict(m) | {"mechanism": "poisson-subsampled-gaussian"} for m in ledger.mechanisms],
        "not_dp": list(ledger.not_dp),
        **extra,
    }


def show_ledger(client_dir: str | Path, budget: float | None = None) -> str:
    """`ksg privacy show`: every DP run on these records, its own ε, the composed ε so far and the budget left."""
    path = Path(client_dir)
    path = path if path.is_file() else path / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no privacy ledger (a DP job's run.output_dir holds one)")
    data = _read(path)
    ledger = PrivacyLedger(data["delta"], data["mechanisms"], data["not_dp"], path=path,
                           fingerprint=data["fingerprint"])
    lines = [f"ledger      {path} (data {ledger.fingerprint}, δ={ledger.delta:g})",
             f"{'run':<32} {'σ':>8} {'q':>8} {'steps':>6} {'ε alone':>8}"]
    for m in ledger.mechanisms:
        lines.append(f"{m.key:<32} {m.noise_multiplier:>8.4f} {m.sample_rate:>8.4f} {m.steps:>6d} "
                     f"{epsilon_for(m.history(), ledger.delta):>8.3f}")
    eps = ledger.epsilon("prv")
    lines.append(f"composed    ε={eps:.3f} (PRV; RDP {ledger.epsilon('rdp'):.3f}) over {len(ledger.mechanisms)} runs")
    if budget is not None:
        over = " (EXCEEDED)" if eps > budget else ""
        lines.append(f"budget      {budget:g}: {max(budget - eps, 0.0):.3f} left{over}")
    if ledger.not_dp:
        lines.append(f"NOT DP      {'; '.join(ledger.not_dp)}")
    return "\n".join(lines)


def add_privacy_args(parser) -> None:
    """Arguments of `ksg privacy show CLIENT_DIR [--budget EPS]`."""
    parser.add_argument("action", choices=["show"], help="show: every run on these records and the composed ε")
    parser.add_argument("client_dir", help="a DP job's run.output_dir (holds privacy_ledger.json), or the file")
    parser.add_argument("--budget", type=float, default=None, help="the total ε budget, to print what is left")


def run_privacy(args) -> int:
    print(show_ledger(args.client_dir, args.budget))
    return 0
