"""CLIENT SIDE — the privacy ledger: every DP run of this client, persisted on the client, and their composed ε.

One ledger per client (`privacy.ledger_dir`; default `$KSG_LEDGER_DIR`, else `$KSG_CACHE/client/ledger`), not
one per data file: a copy of the data with a record added, fixed or reordered holds the same people, so its runs
compose with the others. Each run is an entry keyed by its run id (`Mechanism.run_id`, drawn whenever a run starts
from step 0; only a resume from the run's checkpoint keeps it, and replaces its own entry).

What a run composes with, for its budget and its bundle's ε:
- by default, every published run in the ledger, on these records or any others. Records that overlap records
  already in it are counted with them, and so are edited copies that overlap nothing.
- with `privacy.disjoint_data: true` (the user states that these records are about other people; privacy.json
  says so), only the published runs that share a record with it. Records are matched by fingerprint: an
  HMAC-SHA256 of each record under a random key kept beside the ledger. Neither the key nor the fingerprints
  ever leave the client; the bundle carries neither.
Evaluation-only runs (`privacy.publish: false`: the non-private baseline, the ε grid) are recorded as
*unpublished*: they count toward no bundle's ε and no budget, and no bundle is written from them.

The budget is reserved atomically. Under the ledger's file lock a run re-reads the ledger, checks the composed ε
with itself included (no tolerance over the budget), and writes a *reserved* entry before it trains. After
training the entry is settled as *trained* (the same σ, q and steps, fixed before training). A run that fails
keeps its reservation, which is counted: it may have spent part of it, and counting all of it is the
conservative side. A resume of that run replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ksg_ray.bundle import COMPOSITION
from ksg_ray.client.privacy.accountant import Mechanism, epsilon_for
from ksg_ray.common.errors import KsgError
from ksg_ray.common.hub import cache_root
from ksg_ray.common.jsonl import write_json_atomic
from ksg_ray.common.records import Record

__all__ = ["Entry", "LedgerError", "PrivacyLedger", "add_privacy_args", "check_budget", "check_delta",
           "check_recorded", "default_ledger_dir", "open_ledger", "privacy_report", "run_privacy", "show_ledger"]

LEDGER_FILE = "privacy_ledger.json"
KEY_FILE = "records.key"  # the fingerprints' HMAC key: client only, never in a bundle
RELEASED = ("name", "noise_multiplier", "sample_rate", "steps", "run_id", "records")  # a mechanism in privacy.json


class LedgerError(KsgError, ValueError):
    """A DP run the ledger refuses: another δ, δ ≥ 1/N, over the budget, an unpublished run, or a bundle it lacks."""


@dataclass
class Entry(Mechanism):
    """A run as the ledger keeps it: its mechanism, plus what stays on the client.

    Attributes:
        state: "reserved" from before training until settled as "trained"; a failed run stays reserved (counted).
        published: False for an evaluation-only run: recorded, never counted toward a bundle's ε or a budget.
        record_set: the id of its records' fingerprint set ("" = unknown: it shares records with every run).
        disjoint_data: the user declared its records disjoint from the ledger's other runs.
    """

    state: str = "trained"
    published: bool = True
    record_set: str = ""
    disjoint_data: bool = False


def _entry(m: Mechanism) -> Entry:
    return m if isinstance(m, Entry) else Entry(**asdict(m))


def default_ledger_dir() -> Path:
    """The client's ledger when `privacy.ledger_dir` is not set: `$KSG_LEDGER_DIR`, else `$KSG_CACHE/client/ledger`."""
    return Path(os.environ.get("KSG_LEDGER_DIR") or cache_root() / "client" / "ledger")


class PrivacyLedger:
    """Every DP run of one client. Changes are made in memory (`record`, `add_records`, `mark_not_dp`) and written
    by `save`, `reserve` or `settle`, each under the file lock, merged with what other jobs wrote meanwhile."""

    def __init__(self, path: Path, delta: float, key: bytes = b""):
        self.path, self.delta, self._key = path, delta, key
        self.mechanisms: list[Entry] = []
        self.not_dp: list[str] = []
        self.record_sets: dict[str, list[str]] = {}
        self._changed: dict[str, Entry] = {}

    def add_records(self, records: Iterable[Record]) -> str:
        """Fingerprint `records` (128 bits of HMAC-SHA256 each, under this client's key); returns the set's id."""
        fps = sorted({hmac.new(self._key, json.dumps([r.instruction, r.input, r.output]).encode(),
                               hashlib.sha256).hexdigest()[:32] for r in records})
        set_id = hashlib.sha256("\n".join(fps).encode()).hexdigest()[:16]
        self.record_sets[set_id] = fps
        return set_id

    def counted(self, record_set: str = "", disjoint: bool = False, exclude: str = "") -> list[Entry]:
        """The published runs that a run on `record_set` composes with (without the run keyed `exclude`): all of
        them, or for records declared disjoint those sharing a record with them (an unknown set shares all)."""
        mine = set(self.record_sets.get(record_set, ()))

        def shares(e: Entry) -> bool:
            theirs = self.record_sets.get(e.record_set)
            return not (disjoint and mine) or theirs is None or not mine.isdisjoint(theirs)

        return [e for e in self.mechanisms if e.published and e.key != exclude and shares(e)]

    def history(self, record_set: str = "", disjoint: bool = False,
                exclude: str = "") -> list[tuple[float, float, int]]:
        """The composed (σ, q, steps) history of `counted(...)`."""
        return [h for m in self.counted(record_set, disjoint, exclude) for h in m.history()]

    def epsilon(self, accountant: str = "prv", record_set: str = "", disjoint: bool = False) -> float:
        return epsilon_for(self.history(record_set, disjoint), self.delta, accountant)

    def record(self, mechanism: Mechanism) -> None:
        """Add a run (in memory); a run with the same key (a resume of it) is replaced, never counted twice."""
        entry = _entry(mechanism)
        keys = [m.key for m in self.mechanisms]
        if entry.key in keys:
            self.mechanisms[keys.index(entry.key)] = entry
        else:
            self.mechanisms.append(entry)
        self._changed[entry.key] = entry

    def mark_not_dp(self, what: str) -> None:
        """Record that something read the private data without DP (it voids the guarantee for the bundle)."""
        if what not in self.not_dp:
            self.not_dp.append(what)

    def save(self) -> None:
        """Write under the ledger's lock, merged with what other jobs wrote since this ledger was read."""
        with self._update():
            pass

    def reserve(self, entry: Entry, budget: float | None, accountant: str = "prv") -> float:
        """Atomically check `entry` against the budget and write it as reserved; returns the composed ε.

        Raises:
            LedgerError: the composed ε with `entry` would exceed `budget` (nothing is written).
        """
        with self._update():
            eps = check_budget(self, entry, budget, accountant)
            self.record(replace(entry, state="reserved"))
        return eps

    def settle(self, key: str) -> None:
        """The run keyed `key` has trained: its reservation becomes its mechanism (the same numbers)."""
        with self._update():
            self.record(replace(next(m for m in self.mechanisms if m.key == key), state="trained"))

    def refresh(self) -> None:
        """Re-read what other jobs wrote since (this job's unsaved changes stay on top)."""
        with _locked(self.path):
            self._merge_disk()

    @contextlib.contextmanager
    def _update(self) -> Iterator[None]:
        with _locked(self.path):
            self._merge_disk()
            yield
            write_json_atomic(self.path, {"version": 2, "delta": self.delta, "key_id": _key_id(self._key),
                                          "not_dp": self.not_dp, "runs": [asdict(m) for m in self.mechanisms],
                                          "record_sets": self.record_sets})
            self._changed.clear()

    def _merge_disk(self) -> None:
        """What is on disk, with this job's own changes on top (its other entries may be stale)."""
        if not self.path.exists():
            return
        disk = _read(self.path)
        _check_same(disk, self.path, self.delta, self._key)
        keys = {m.key for m in disk["runs"]}
        self.mechanisms = [self._changed.get(m.key, m) for m in disk["runs"]] + \
                          [m for k, m in self._changed.items() if k not in keys]
        self.not_dp = list(dict.fromkeys(disk["not_dp"] + self.not_dp))
        self.record_sets = disk["record_sets"] | self.record_sets


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
    """The ledger file; a version-1 ledger (one per data file, `mechanisms`) reads as published, trained runs of
    unknown records."""
    data = json.loads(path.read_text())
    return data | {"runs": [Entry(**m) for m in data.get("runs", data.get("mechanisms", []))],
                   "not_dp": data.get("not_dp", []), "record_sets": data.get("record_sets", {})}


def _key_id(key: bytes) -> str:
    return hmac.new(key, b"ksg-ray ledger key", hashlib.sha256).hexdigest()[:16]


def _check_same(data: dict, path: Path, delta: float, key: bytes) -> None:
    if data["delta"] != delta:
        raise LedgerError(f"{path} accounts at δ={data['delta']}; this run asks δ={delta}: use the same δ on this "
                          "client (one below 1/N for every data set)")
    if data.get("key_id", _key_id(key)) != _key_id(key):
        raise LedgerError(f"{path}: its record key ({KEY_FILE}) was replaced, so its fingerprints no longer match; "
                          "restore the key")


def _client_key(ledger_dir: Path) -> bytes:
    """This client's fingerprint key, drawn on first use (mode 0600)."""
    path = ledger_dir / KEY_FILE
    with _locked(ledger_dir / LEDGER_FILE):
        if not path.exists():
            if (ledger_dir / LEDGER_FILE).exists():
                raise LedgerError(f"{path} is missing but {ledger_dir / LEDGER_FILE} exists: restore the key")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return bytes.fromhex(path.read_text().strip())


def open_ledger(ledger_dir: str | Path | None, delta: float) -> PrivacyLedger:
    """Load (or start) the client's ledger in `ledger_dir` (None = `default_ledger_dir()`).

    Raises:
        LedgerError: the ledger was kept at another δ, or its record key is missing or replaced.
    """
    ledger_dir = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    ledger = PrivacyLedger(ledger_dir / LEDGER_FILE, delta, _client_key(ledger_dir))
    ledger.refresh()
    return ledger


def check_delta(delta: float, num_records: int) -> None:
    """δ must be below 1/N, or "leak one record in the clear" would satisfy the guarantee."""
    if not delta < 1 / num_records:
        raise LedgerError(f"privacy.delta={delta} must be < 1/N = {1 / num_records:.2e} for N={num_records} records")


def check_budget(ledger: PrivacyLedger, planned: Mechanism, budget: float | None, accountant: str = "prv") -> float:
    """Composed ε once `planned` joins the runs it composes with; refuses (LedgerError, before anything is
    trained) if that exceeds `budget` (None = no cap beyond each model's own target). An unpublished run counts
    toward no budget: its own ε is returned."""
    planned = _entry(planned)
    if not planned.published:
        return epsilon_for(planned.history(), ledger.delta, accountant)
    prior = ledger.counted(planned.record_set, planned.disjoint_data, exclude=planned.key)
    eps = epsilon_for([h for m in prior for h in m.history()] + planned.history(), ledger.delta, accountant)
    if budget is not None and eps > budget:
        spent = epsilon_for([h for m in prior for h in m.history()], ledger.delta, accountant)
        raise LedgerError(
            f"refused: training {planned.name!r} (σ={planned.noise_multiplier:.4f}, q={planned.sample_rate:.4f}, "
            f"{planned.steps} steps) would bring the composed ε on these records to {eps:.3f} > budget {budget} "
            f"(already spent or reserved by {[f'{m.key} ({m.state})' for m in prior]}: ε={spent:.3f}; "
            f"ledger {ledger.path})"
        )
    return eps


def check_recorded(ledger: PrivacyLedger, released: list[dict], source: str) -> None:
    """Every mechanism a bundle's `privacy.json` lists must be in this ledger, with the same numbers: a reward
    model composed against a ledger that lacks the generator would under-report ε.

    Raises:
        LedgerError: naming each missing or disagreeing mechanism and where the ledger is.
    """
    mine = {m.key: m for m in ledger.mechanisms if m.published}
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
                          + "; ".join(problems) + ". Run this job with the generator's privacy.ledger_dir.")


def privacy_report(ledger: PrivacyLedger, record_set: str = "", disjoint: bool = False, **extra) -> dict:
    """The bundle's privacy.json for a run on `record_set`: every published run it composes with (each with its
    own N), the composed ε, every non-DP use of the data, and whether the records were declared disjoint."""
    counted = ledger.counted(record_set, disjoint)
    history = [h for m in counted for h in m.history()]
    return {
        "epsilon": epsilon_for(history, ledger.delta, "prv"),
        "epsilon_rdp": epsilon_for(history, ledger.delta, "rdp"),
        "delta": ledger.delta,
        "accountant": "prv",
        "composition": COMPOSITION,
        "mechanisms": [{k: getattr(m, k) for k in RELEASED if k != "records" or m.records}
                       | {"mechanism": "poisson-subsampled-gaussian"} for m in counted],
        "not_dp": list(ledger.not_dp),
        "disjoint_data": disjoint,
        **extra,
    }


def show_ledger(ledger_dir: str | Path | None = None, budget: float | None = None) -> str:
    """`ksg privacy show`: every run of this client, its own ε, the composed ε of the published runs, the budget
    left."""
    path = Path(ledger_dir) if ledger_dir is not None else default_ledger_dir()
    path = path if path.is_file() else path / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no privacy ledger (privacy.ledger_dir of a DP job holds one)")
    data = _read(path)
    ledger = PrivacyLedger(path, data["delta"])
    ledger.mechanisms, ledger.not_dp, ledger.record_sets = data["runs"], data["not_dp"], data["record_sets"]
    lines = [f"ledger      {path} (δ={ledger.delta:g}, {len(ledger.record_sets)} record sets)",
             f"{'run':<32} {'σ':>8} {'q':>8} {'steps':>6} {'N':>6} {'ε alone':>8}  state"]
    for m in ledger.mechanisms:
        state = m.state + ("" if m.published else ", unpublished") + (", disjoint data" if m.disjoint_data else "")
        lines.append(f"{m.key:<32} {m.noise_multiplier:>8.4f} {m.sample_rate:>8.4f} {m.steps:>6d} {m.records:>6d} "
                     f"{epsilon_for(m.history(), ledger.delta):>8.3f}  {state}")
    eps = ledger.epsilon("prv")
    lines.append(f"composed    ε={eps:.3f} (PRV; RDP {ledger.epsilon('rdp'):.3f}) over "
                 f"{len(ledger.counted())} published runs (a run on data declared disjoint composes with fewer)")
    if budget is not None:
        over = " (EXCEEDED)" if eps > budget else ""
        lines.append(f"budget      {budget:g}: {max(budget - eps, 0.0):.3f} left{over}")
    if ledger.not_dp:
        lines.append(f"NOT DP      {'; '.join(ledger.not_dp)}")
    return "\n".join(lines)


def add_privacy_args(parser) -> None:
    """Arguments of `ksg privacy show [LEDGER_DIR] [--budget EPS]`."""
    parser.add_argument("action", choices=["show"], help="show: every run of this client and the composed ε")
    parser.add_argument("ledger_dir", nargs="?", default=None,
                        help="privacy.ledger_dir (holds privacy_ledger.json), or the file; default: the client's")
    parser.add_argument("--budget", type=float, default=None, help="the total ε budget, to print what is left")


def run_privacy(args) -> int:
    print(show_ledger(args.ledger_dir, args.budget))
    return 0
