"""Private Q&A records: one loader for every format a client's data arrives in, and strict checks on it.

A record is `instruction` (task preamble, may be empty), `input` (the question) and `output` (the answer).
Every record is validated before anything is trained on it: a bad row found on a worker hours into a DP run
would waste budget, so errors are raised here, naming the file, the line (or row) and the field to fix.

Sources: `demo` / `demo:medical` / `demo:financial` (the packaged demo data), `*.jsonl` / `*.json` (one object
a line), `*.parquet`, `hf:NAME[:SPLIT]` (Hugging Face hub) and a directory written by `datasets`'
`save_to_disk`. The last two need the optional `datasets` package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksg_ray.common.errors import KsgError
from ksg_ray.common.jsonl import read_jsonl, write_jsonl_atomic

__all__ = ["DEMO_DATASETS", "DataError", "Record", "load_records", "write_jsonl"]

DEMO_DIR = Path(__file__).parents[1] / "demo_data"
DEMO_DATASETS = ("medical", "financial")
FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Record:
    """One private example. Frozen so a record cannot be changed behind the privacy accounting's back.

    Attributes:
        instruction: task preamble, rendered as the system message ("" = none).
        input: the user's question.
        output: the expert's answer (the tokens the model is trained on).
        source: "file:line" (or "file:row") it came from, so any error or audit finding can be traced back.
    """

    instruction: str
    input: str
    output: str
    source: str = ""


class DataError(KsgError, ValueError):
    """Bad input data. The message names the file and, where relevant, the 1-based line (or row) and field."""


def load_records(
    source: str | Path, *, limit: int | None = None, require_output: bool = True
) -> list[Record]:
    """Read and validate records from `source`.

    The whole source is validated even with a `limit`, so a short trial run fails on the same bad line as
    the full run would.

    Args:
        source: "demo", "demo:medical", "demo:financial", a `.jsonl`/`.json`/`.parquet` file,
            "hf:NAME[:SPLIT]" or a `datasets.save_to_disk` directory.
        limit: keep only the first `limit` records (deterministic: file order).
        require_output: reject records whose `output` is empty or whitespace (training needs an answer;
            prompts for generation do not).

    Returns:
        The records, in source order.

    Raises:
        DataError: the source is missing, empty, malformed, or a record lacks a string field.
        ValueError: `limit` is not a positive integer.
        ImportError: an `hf:` or `save_to_disk` source without the `datasets` package installed.

    Examples:
        >>> load_records("demo:financial", limit=2)[0].instruction  # doctest: +SKIP
        'Answer this personal finance question.'
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    text = str(source)
    if text == "demo" or text.startswith("demo:"):
        name = text.partition(":")[2] or "medical"
        if name not in DEMO_DATASETS:
            choices = ", ".join(f"demo:{d}" for d in DEMO_DATASETS)
            raise DataError(f"{text}: unknown demo data set; use one of {choices}")
        path: Path | None = DEMO_DIR / f"{name}.jsonl"
    elif text.startswith("hf:"):
        path = None
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: file not found")

    if path is None:
        name, _, split = text[3:].partition(":")
        rows = _enumerate_rows(_datasets().load_dataset(name, split=split or "train"), text)
    elif path.is_dir():
        rows = _enumerate_rows(_load_from_disk(path), str(path))
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: unsupported format; use .jsonl, .json, .parquet, hf:NAME[:SPLIT], "
                        "a datasets save_to_disk directory, or demo")
    records = [_to_record(row, where, src, require_output) for row, where, src in rows]
    if not records:
        raise DataError(f"{path or text}: no records (empty file)")
    return records[:limit]


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write records as JSONL (instruction/input/output), atomically: a crash never leaves half a file.

    `source` is not written: it describes where a record was read from, not the record.
    """
    write_jsonl_atomic(path, ({k: getattr(r, k) for k in FIELDS} for r in records))


# Each reader yields (row, where-for-errors, source-for-traceability).
Rows = Iterator[tuple[Any, str, str]]


def _jsonl_rows(path: Path) -> Rows:
    for lineno, row in read_jsonl(path, DataError):
        yield row, f"{path}:{lineno}", f"{path}:{lineno}"


def _parquet_rows(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    for i, row in enumerate(table.to_pylist(), 1):
        yield row, f"{path}: row {i}", f"{path}:{i}"


def _enumerate_rows(dataset: Iterable[dict], name: str) -> Rows:
    for i, row in enumerate(dataset, 1):
        yield row, f"{name}: row {i}", f"{name}:{i}"


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: sources and save_to_disk directories need the `datasets` package: "
                          "pip install datasets") from e
    return datasets


def _load_from_disk(path: Path):
    ds = _datasets().load_from_disk(str(path))
    if isinstance(ds, dict):  # a DatasetDict: the training split is the private data
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return ds


def _to_record(row: Any, where: str, source: str, require_output: bool) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row:
            raise DataError(f"{where}: field '{field}' is missing")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    if require_output and not row["output"].strip():
        raise DataError(f"{where}: field 'output' is empty (training needs an answer)")
    return Record(row["instruction"], row["input"], row["output"], source)
