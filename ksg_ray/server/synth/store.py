"""SERVER SIDE — append-only JSONL stores keyed by deterministic ids: what makes a synthesis run resumable.

Only model work is stored (one row per finished unit: a prompt's samples, a query's scored candidates, a
refinement round's rewrites); everything derived from it (parsing, filtering, ranking, the final dataset) is
recomputed from the stores on every run. A rerun therefore skips finished units, redoes unfinished ones and
cannot duplicate anything: a row whose id is already stored is refused. A line cut short by a killed process
is cut off when the store is opened.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ksg_ray.common.jsonl import read_jsonl

__all__ = ["JsonlStore"]

logger = logging.getLogger(__name__)


class JsonlStore:
    """Rows of one JSONL file, by `key`; `append` writes through (flushed) so a crash loses at most one row.

    Args:
        path: the JSONL file (created with its directory when missing).
        key: the field holding each row's unique id.

    Raises:
        ValueError: a complete line of the file is not JSON or has no `key` (the message names file and line).
    """

    def __init__(self, path: str | Path, key: str = "id") -> None:
        self.path, self.key = Path(path), key
        self.rows: dict[str, dict[str, Any]] = {}
        self.refused = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # the process died while writing the last line
            logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run",
                           self.path, len(data) - len(complete))
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        for n, row in read_jsonl(self.path, text=complete.decode("utf-8"), hint="; fix or delete the line"):
            if not isinstance(row, dict) or self.key not in row:
                raise ValueError(f"{self.path}:{n}: row has no '{self.key}' field")
            self.rows[str(row[self.key])] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> bool:
        """Store `row` unless its id is already stored (then count it in `refused` and return False)."""
        key = str(row[self.key])
        if key in self.rows:
            self.refused += 1
            logger.warning("%s: id %s already stored; the duplicate is not written", self.path.name, key)
            return False
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.rows[key] = row
        return True

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
