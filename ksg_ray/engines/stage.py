"""Ray Data stage: answer every row's chat prompt with an `Engine`, in the style of `ray.data.llm` stages.

Each actor of an actor pool loads its engine once; batches then stream through it. A row whose generation
fails is kept and reported in `__error__` ("Type: message") with null outputs, so one bad prompt costs one row,
not the job, and the schema stays the same for every row. Errors that mean the engine itself is gone (out of
memory, vLLM's EngineDeadError) are re-raised: every later row would fail too.

Stages chain: a row that already carries an `__error__` from an earlier stage, or whose prompt is None (an
earlier stage decided it needs no work, e.g. a query the judge rejected), passes through untouched with null
outputs. The helpers at the bottom (`run_with_fallback`, `passthrough`, `incoming_errors`) are shared by every
stage UDF in `ksg_ray.synth`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import ray

from ksg_ray.engines import SamplingParams, build_engine, check_messages

__all__ = ["ERROR_COLUMN", "GenerateUDF", "generate_dataset", "incoming_errors", "passthrough", "to_messages",
           "is_missing", "plain", "row_seed", "run_with_fallback"]

logger = logging.getLogger(__name__)

ERROR_COLUMN = "__error__"
FATAL_ERRORS: tuple[type[BaseException], ...] = (MemoryError,)  # plus the engine's own `fatal_errors`


class GenerateUDF:
    """A `map_batches` callable class: chat prompts in, `n` generations per row out.

    Columns read: `messages_column`, a list of {"role", "content"} string messages per row.
    Columns written: `output_column` (list of `n` answer texts), `<output_column>_finished` (list of `n`
    bools: the answer ended with end-of-turn rather than at `max_new_tokens`), and `__error__` (None, or
    "Type: message" for a row that failed; its outputs are then None). Other columns pass through.

    Args:
        engine_kind: "transformers", "vllm" or "auto" (see `ksg_ray.engines.build_engine`).
        model_path: a local model folder or hub id.
        adapter_path: a peft adapter folder, or None.
        sampling: `SamplingParams` fields as a dict (plain data travels to actors and configs unchanged).
        messages_column: the input column.
        output_column: the output column; its `_finished` twin is derived from it.
        engine_kwargs: extra engine options (e.g. `batch_size` for transformers, `gpu_memory_utilization`
            for vLLM).
        seed_column: with `sampling["seed"]` set, the column whose value keys each row's own sampling seed:
            a row's samples then depend on (seed, its key, the output column) only, not on how Ray batched it.
    """

    def __init__(self, engine_kind: str, model_path: str, adapter_path: str | None, sampling: dict,
                 messages_column: str = "messages", output_column: str = "generations",
                 engine_kwargs: dict | None = None, seed_column: str | None = None) -> None:
        self.params = SamplingParams(**sampling)  # fail at actor start, not on the first batch
        self.messages_column = messages_column
        self.output_column = output_column
        self.seed_column = seed_column if self.params.seed is not None else None
        self.engine = build_engine(engine_kind, model_path, adapter_path, **(engine_kwargs or {}))
        self.fatal_errors = tuple(getattr(self.engine, "fatal_errors", ()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Generate for one batch; see the class docstring for the columns.

        Raises:
            KeyError: the batch has no `messages_column` (a pipeline error, not a row error).
        """
        if self.messages_column not in batch:
            raise KeyError(f"GenerateUDF needs the column {self.messages_column!r} (a list of chat messages per "
                           f"row); the batch has {sorted(batch)}. Set messages_column to the right one.")
        errors = incoming_errors(batch)
        prompts: list[list[dict] | None] = []
        for i, raw in enumerate(batch[self.messages_column]):
            prompt = None
            if errors[i] is None and not is_missing(raw):
                try:
                    prompt = check_messages(to_messages(raw))
                except ValueError as e:  # malformed rows are known without running the model
                    errors[i] = describe(e)
            prompts.append(prompt)
        todo = [i for i, p in enumerate(prompts) if p is not None]
        seeds = None
        if self.seed_column is not None:
            seeds = [row_seed(self.params.seed, plain(k), self.output_column) for k in batch[self.seed_column]]

        def generate(idx: list[int]) -> list[Any]:
            return self.engine.generate([prompts[i] for i in idx], self.params,
                                        **({"seeds": [seeds[i] for i in idx]} if seeds is not None else {}))

        results, row_errors = run_with_fallback(generate, todo, self.fatal_errors)
        for i, e in row_errors.items():
            errors[i] = e
        out = passthrough(batch)
        out[self.output_column] = [None if (r := results.get(i)) is None else [g.text for g in r]
                                   for i in range(len(prompts))]
        out[f"{self.output_column}_finished"] = [None if (r := results.get(i)) is None else [g.finished for g in r]
                                                 for i in range(len(prompts))]
        out[ERROR_COLUMN] = errors
        return out


def generate_dataset(ds: ray.data.Dataset, *, engine_kind: str, model_path: str, adapter_path: str | None,
                     sampling: SamplingParams, batch_size: int, min_actors: int = 1, max_actors: int = 1,
                     messages_column: str = "messages", output_column: str = "generations", num_cpus: float = 1,
                     num_gpus: float = 0, engine_kwargs: dict | None = None) -> ray.data.Dataset:
    """Add generations to every row of `ds` (lazily), on an autoscaling pool of engine actors.

    Args:
        ds: rows with a `messages_column`.
        engine_kind: "transformers", "vllm" or "auto".
        model_path: a local model folder or hub id, readable on every node.
        adapter_path: a peft adapter folder readable on every node, or None.
        sampling: how to sample (`n` answers per row).
        batch_size: rows per engine call: larger batches use the accelerator better, smaller ones lose less
            work to a retry.
        min_actors: actors kept alive (each holds a model).
        max_actors: the most actors the pool scales to.
        messages_column: the input column.
        output_column: the output column (also `<output_column>_finished`, and `__error__`).
        num_cpus: CPUs per actor.
        num_gpus: GPUs per actor (1 for a vLLM actor on a GPU node; 0 on CPU).
        engine_kwargs: extra engine options, see `GenerateUDF`.

    Returns:
        The lazy dataset with the output columns added.

    Examples:
        >>> ds = ray.data.from_items([{"messages": [{"role": "user", "content": "Hi"}]}])
        >>> out = generate_dataset(ds, engine_kind="auto", model_path=resolve_model("smollm2-135m"),
        ...                        adapter_path=None, sampling=SamplingParams(n=6, temperature=1.0, top_p=0.7),
        ...                        batch_size=16)
    """
    if min_actors < 1 or max_actors < min_actors:
        raise ValueError(f"need 1 <= min_actors <= max_actors, got min_actors={min_actors}, max_actors={max_actors}")
    return ds.map_batches(
        GenerateUDF,
        fn_constructor_kwargs=dict(engine_kind=engine_kind, model_path=model_path, adapter_path=adapter_path,
                                   sampling=dataclasses.asdict(sampling), messages_column=messages_column,
                                   output_column=output_column, engine_kwargs=engine_kwargs),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def row_seed(seed: int, key: Any, salt: str = "") -> int:
    """A 63-bit sampling seed from (seed, a row's key, a salt): the same on every run, node and batch."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def is_missing(value: Any) -> bool:
    """None, or the float NaN that Ray Data hands back for a column whose every value in a block was None."""
    return value is None or (isinstance(value, float | np.floating) and np.isnan(value))


def incoming_errors(batch: Mapping[str, Any]) -> list[str | None]:
    """The `__error__` of every row so far (all None for a batch that has not been through a stage)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [None if is_missing(e) else str(e) for e in batch[ERROR_COLUMN]] if ERROR_COLUMN in batch else [None] * n


def run_with_fallback(fn: Callable[[list[int]], list[Any]], todo: list[int],
                      fatal_errors: tuple[type[BaseException], ...]) -> tuple[dict[int, Any], dict[int, str]]:
    """`fn(todo)` for the whole batch; if it fails, row by row, so only the bad rows are lost.

    Returns:
        ({row index: result}, {row index: "Type: message"}); together they cover `todo`.

    Raises:
        Any of `fatal_errors` (plus MemoryError), outside a Ray actor: the engine itself is gone, every later
        row would fail too. Inside a Ray actor the process exits instead (see `_engine_gone`).
    """
    fatal = FATAL_ERRORS + tuple(fatal_errors)
    if not todo:
        return {}, {}
    try:
        return dict(zip(todo, fn(todo), strict=True)), {}
    except fatal as e:
        _engine_gone(e)
    except Exception as e:  # one bad row fails the whole call: retry row by row to find it
        logger.warning("batch of %d failed (%s); retrying row by row", len(todo), describe(e))
    results, errors = {}, {}
    for i in todo:
        try:
            results[i] = fn([i])[0]
        except fatal as e:
            _engine_gone(e)
        except Exception as row_error:
            errors[i] = describe(row_error)
    return results, errors


def _engine_gone(e: BaseException) -> None:
    """A dead engine: in a Ray Data actor, exit the process so Ray restarts the actor (a fresh engine) and
    retries the batch there — re-raising would retry on this same broken actor forever (ray#60145). Elsewhere
    re-raise."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        logger.error("engine is gone (%s): exiting so Ray restarts this actor", describe(e))
        os._exit(1)
    raise e


def passthrough(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's columns as a new dict, nested values as plain Python.

    Nested columns arrive as object arrays of numpy arrays, which Ray cannot turn back into Arrow lists (it
    would pickle them): they are handed back as plain Python so the schema survives the stage.
    """
    return {k: col if isinstance(col, np.ndarray) and col.dtype != object else [plain(v) for v in col]
            for k, col in batch.items()}


def to_messages(raw: Any) -> Any:
    """Plain Python messages from what Ray Data hands over (numpy object arrays of dicts).

    Arrow stores a column of message lists as list<struct>, so every message gets every key seen in the
    column; keys that are None only because another row had them are dropped (role and content are kept,
    so that a missing one is reported).
    """
    raw = plain(raw)
    if not isinstance(raw, list):
        return raw
    return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")}
            if isinstance(m, Mapping) else m for m in raw]


def plain(value: Any) -> Any:
    """Numpy arrays, scalars and the dicts holding them, recursively as lists, Python scalars and dicts."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.dtype != object else [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
