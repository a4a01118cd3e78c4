"""File I/O every stage shares: one atomic writer and one JSON-lines reader with line-numbered errors.

Atomic means a reader (or a resumed run) never sees half a file: the text goes to a temporary file in the same
folder, which then replaces the target in one `os.replace`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "json_safe", "read_jsonl", "write_json_atomic", "write_jsonl_atomic"]


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(x: Any) -> Any:
    """NaN → None (missing); ±inf → "inf"/"-inf"; recursively (strict JSON has neither)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Write JSON (NaN as null, inf as "inf") atomically."""
    with atomic_open(path) as f:
        json.dump(json_safe(data), f, indent=indent, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return Path(path)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (NaN as null, inf as "inf"), atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


def read_jsonl(path: str | Path, error: type[Exception] = ValueError, text: str | None = None,
               hint: str = "") -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed row) for every non-blank line; a bad line raises `error` naming file:line.

    `text`: the file's content when the caller has already read it (e.g. cut at the last complete line).
    """
    lines = (text if text is not None else Path(path).read_text(encoding="utf-8")).splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: not valid JSON: {e}{hint}") from e
