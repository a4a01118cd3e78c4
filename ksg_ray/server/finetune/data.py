"""SERVER SIDE — the fine-tuning data: synthetic rows with their round, the round filter and the dev set.

The synthesis job writes `synthetic.jsonl` / `.parquet` whose rows are records (`instruction`, `input`,
`output`) plus provenance; `round` says which RewardDS pool a row belongs to (0 = the reward-filtered pool,
r >= 1 = added by refinement round r), so `data.max_round` selects the pool of one fine-tuning round. The
records are read and validated by `ksg_ray.common.records.load_records` (errors name file and line); `round` is read
beside them here, with the same file:line errors.

The dev set is public: a held-out file (`dev.path`), or else round-0 queries (`dev.holdout_fraction` of them, at
most `dev.limit`) removed from training with every row that asks them (refinement rewrites answers, never
queries, so a held-out query would otherwise come back in a later round's rows). A data set of one distinct
query (a strict reward filter on a tiny funnel) has nothing to hold out: it trains with NO dev set, the last
epoch is exported, and `dev_source` says so in the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ksg_ray.common.records import DataError, Record, load_records

__all__ = ["DEV_OFF", "NO_DEV", "FinetuneData", "format_dev_score", "load_finetune_data", "read_rounds"]

logger = logging.getLogger(__name__)

NO_DEV = "none: one distinct query, nothing to hold out; the last epoch is exported, not selected on a dev set"
DEV_OFF = "none (dev.limit=0): every row trains; the last epoch is exported, not selected on a dev set"


def format_dev_score(score: float | None) -> str:
    """A dev ROUGE-L for logs and summaries; None is a run without a dev set (`NO_DEV`)."""
    return "n/a (no dev set)" if score is None else f"{score:.4f}"


@dataclass
class FinetuneData:
    """What one fine-tuning run trains and selects on.

    Attributes:
        train: training records (round <= max_round, dev queries removed).
        dev: dev records (prompt = instruction + input, reference = output).
        rounds_per_row: count of training rows per round.
        dev_source: where the dev records came from (the file, "held out of PATH", or `NO_DEV`).
        fingerprint: sha256 over train and dev texts; a resumed run must see the same data.
    """

    train: list[Record]
    dev: list[Record]
    rounds_per_row: dict[int, int]
    dev_source: str
    fingerprint: str


def read_rounds(path: str | Path, count: int) -> list[int]:
    """The `round` of each of the `count` records of `path`, in file order (as `load_records` reads them).

    A source with no `round` anywhere (a plain record file, the demo data) is all round 0; once any row has
    one, every row must.

    Raises:
        DataError: a row lacks `round` or it is not a non-negative integer (file and line named).
    """
    text = str(path)
    p = Path(path)
    if text.startswith(("demo", "hf:")) or p.is_dir():
        return [0] * count
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(p)
        if "round" not in schema.names:
            return [0] * count
        values = pq.read_table(p, columns=["round"]).column("round").to_pylist()
        where = [f"{p}: row {i}" for i in range(1, len(values) + 1)]
    else:
        values, where = [], []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():  # load_records has already checked every line is a JSON object
                    values.append(json.loads(line).get("round", _MISSING))
                    where.append(f"{p}:{lineno}")
        if all(v is _MISSING for v in values):
            return [0] * count
    rounds = []
    for v, w in zip(values, where, strict=True):
        if v is _MISSING or v is None:
            raise DataError(f"{w}: field 'round' is missing (other rows of this file have one)")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(f"{w}: field 'round' must be a non-negative integer, got {v!r}")
        rounds.append(v)
    return rounds


def load_finetune_data(path: str, *, max_round: int | None, dev_path: str | None, dev_limit: int,
                       holdout_fraction: float = 0.2, limit: int | None = None, seed: int = 0) -> FinetuneData:
    """Read the synthetic rows of rounds <= `max_round` and the dev set.

    Args:
        path: the synthetic data set (anything `load_records` reads).
        max_round: keep rows with round <= this; None keeps every row.
        dev_path: public held-out records; None holds out round-0 queries instead: `holdout_fraction` of them
            (at least one), at most `dev_limit`; none when there is a single distinct query (`NO_DEV`).
        dev_limit: dev records used; 0 = no dev set (`DEV_OFF`: a one-epoch run has no epoch to select).
        holdout_fraction: see `dev_path`.
        limit: train on the first `limit` rows only (after the round filter and the hold-out).
        seed: picks the held-out queries.

    Raises:
        DataError: a bad row (file and line named), or no row left after the round filter.
    """
    records = load_records(path)
    rounds = read_rounds(path, len(records))
    keep = [(r, k) for r, k in zip(records, rounds, strict=True) if max_round is None or k <= max_round]
    if not keep:
        raise DataError(f"{path}: no row has round <= {max_round} (rounds present: {sorted(set(rounds))})")
    if dev_limit == 0:
        dev, dev_source = [], DEV_OFF
    elif dev_path is not None:
        dev = load_records(dev_path, limit=dev_limit)
        dev_source = str(dev_path)
    else:
        pool = sorted({r.input for r, k in keep if k == 0})
        if len(pool) < 2:  # a tiny round-0 pool: hold out a query of a later round rather than the whole pool
            pool = sorted({r.input for r, _ in keep})
        if len(pool) < 2:  # a funnel that kept one query: train on it, select nothing, and say so everywhere
            logger.warning("%s: %d distinct query: none can be held out for dev and still train; NO dev set, the "
                           "last epoch is exported (give dev.path to select an epoch)", path, len(pool))
            held: set[str] = set()
        else:
            held = set(random.Random(seed).sample(pool, min(dev_limit, max(1, int(holdout_fraction * len(pool))))))
        first: dict[str, Record] = {}  # the reference answer: the query's first round-0 row (else its first row)
        for r, _ in sorted(keep, key=lambda rk: rk[1] != 0):
            if r.input in held:
                first.setdefault(r.input, r)
        dev = [first[q] for q in sorted(held)]
        keep = [(r, k) for r, k in keep if r.input not in held]
        dev_source = f"held out of {path}" if held else NO_DEV
    keep = keep[:limit]
    train = [r for r, _ in keep]
    digest = hashlib.sha256()
    for r in [*train, *dev]:
        digest.update(json.dumps([r.instruction, r.input, r.output]).encode())
    return FinetuneData(train=train, dev=dev, rounds_per_row=dict(sorted(Counter(k for _, k in keep).items())),
                        dev_source=dev_source, fingerprint=digest.hexdigest())


_MISSING = object()
