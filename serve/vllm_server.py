"""SERVER SIDE — `engine.kind: vllm`: Ray's own `ray.serve.llm` deployment behind our ingress.

`build_llm_deployment` runs one vLLM engine per replica: its async engine batches continuously, streams token by
token, and Serve restarts and autoscales its replicas, as users of `ray.serve.llm` expect. Our `OpenAIIngress`
stays in front (auth, body caps, OpenAI errors: `ray.serve.llm` has no auth, Ray issue #59578) and talks to it
as to `ModelServer`: `KsgLLMServer` adds that protocol (`generate`, `stream`) to `LLMServer`, through the
`deployment_cls` extension point of `build_llm_deployment`.

- Every model id of the app shares one base: the base itself, or a distilled peft adapter on it, served as a
  LoRA of that one engine. Prompts are our chat format's tokens (`prompt_ids`), sent as completions of token
  ids, so they match training token for token.
- Adapters load from local folders (or the cluster's shared storage). `ray.serve.llm` itself downloads LoRA
  weights only from cloud storage (`dynamic_lora_loading_path` must be an s3/gs/abfss/azure URI); a run's
  adapters are local folders, and copying them to a bucket only to download them again on the same machine
  buys nothing. `KsgLLMServer._maybe_resolve_lora_from_multiplex` (LLMServer's per-request LoRA hook) hands
  the engine the adapter's folder instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from ksg_ray.engines import Generation, SamplingParams
from ksg_ray.serve.config import ServeAppConfig
from ksg_ray.serve.model_server import checked_prompt_ids, server_error
from ksg_ray.serve.openai_protocol import APIError

__all__ = ["KsgLLMServer", "build_vllm_deployment"]

BASE_ID = "ksg-shared-base"  # vLLM's name for the base; requests for a model id without an adapter use it


def build_vllm_deployment(cfg: ServeAppConfig) -> serve.Application:
    """The app's models as one `ray.serve.llm` deployment (`KsgLLMServer`): one vLLM engine on their shared base.

    Raises:
        ValueError: the models do not share one base (each model id and its base are named).
    """
    from ksg_ray.common.hub import model_dir_engine_args
    from ksg_ray.engines.vllm_engine import cpu_engine_defaults, lora_engine_kwargs

    entries = {model_id: model_dir_engine_args(where) for model_id, where in cfg.models.items()}
    bases = {base for base, _ in entries.values()}
    if len(bases) != 1:
        raise ValueError(f"engine.kind=vllm serves every model id on one base (LoRA per request); these models "
                         f"have {len(bases)}: { {k: b for k, (b, _) in entries.items()} }")
    base = bases.pop()
    adapters = {model_id: adapter for model_id, (_, adapter) in entries.items() if adapter is not None}
    engine = cfg.engine
    kwargs: dict[str, Any] = {}
    placement = None
    if engine.num_gpus == 0:
        kwargs |= cpu_engine_defaults()
        placement = {"bundles": [{"CPU": max(engine.num_cpus, 1.0)}]}  # vLLM's CPU worker: a core at least
    for adapter in adapters.values():
        lora = lora_engine_kwargs(adapter)
        kwargs["max_lora_rank"] = max(kwargs.get("max_lora_rank", 0), lora.pop("max_lora_rank"))
        kwargs |= lora
    if adapters:
        kwargs["max_loras"] = min(len(adapters), engine.max_models_per_replica)
    kwargs |= engine.engine_kwargs
    llm_config = LLMConfig(
        model_loading_config={"model_id": BASE_ID, "model_source": base},
        engine_kwargs=kwargs,
        placement_group_config=placement,
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}} if engine.num_gpus == 0 else None,
        deployment_config={"autoscaling_config": cfg.autoscaling.serve_options(),
                           "max_ongoing_requests": cfg.ingress.model_max_ongoing_requests,
                           "ray_actor_options": {"num_cpus": 0.1}},  # the engine's bundle holds its CPUs
    )
    return build_llm_deployment(llm_config, deployment_cls=KsgLLMServer,
                                bind_kwargs={"adapters": adapters, "max_prompt_tokens": cfg.limits.max_prompt_tokens})


class KsgLLMServer(LLMServer):
    """`LLMServer` that answers our ingress's `ModelServer` protocol (plain-dict results, error payloads).

    Args:
        llm_config: the vLLM engine and deployment (`build_vllm_deployment`).
        adapters: model id -> adapter folder; a model id without one is the base.
        max_prompt_tokens: longest prompt accepted, chat template included.
    """

    async def __init__(self, llm_config: LLMConfig, *, adapters: dict[str, str], max_prompt_tokens: int) -> None:
        from transformers import AutoTokenizer

        self._adapters, self._max_prompt_tokens = adapters, max_prompt_tokens
        source = llm_config.model_loading_config.model_source
        self._tokenizer = AutoTokenizer.from_pretrained(source)
        self._context = int(llm_config.engine_kwargs.get("max_model_len") or 0) or None
        await super().__init__(llm_config)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """The request's model id (our ingress routes by it) -> its adapter folder, loaded into the engine once."""
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
        from ray.llm._internal.serve.utils.lora_serve_utils import global_id_manager

        model_id = serve.get_multiplexed_model_id()
        if model_id in self._adapters:
            await self.engine.resolve_lora(DiskMultiplexConfig(
                model_id=model_id, max_total_tokens=None, local_path=self._adapters[model_id],
                lora_assigned_int_id=global_id_manager.next()))

    async def generate(self, prompts: list[list[dict]], params: SamplingParams) -> dict[str, Any]:
        """`params.n` answers per prompt (see `ModelServer.generate`)."""
        try:
            ids = [self._prompt(messages, params) for messages in prompts]  # refuse before any work
            gens = await asyncio.gather(*(self._complete(p, params) for p in ids))  # vLLM batches them
        except Exception as e:
            return server_error(e).to_payload()
        return {"prompt_tokens": sum(map(len, ids)), "generations": gens}

    async def _complete(self, ids: list[int], params: SamplingParams) -> list[Generation]:
        # vLLM refuses n > 1 for greedy decoding: one answer, copied n times (as our engines do)
        n = 1 if params.greedy else params.n
        out = await self._first(await self.completions(self._request(ids, params, n=n, stream=False)))
        if getattr(out, "choices", None) is None:  # an ErrorResponse
            raise _engine_error(out)
        gens = [Generation(text=c.text.strip(), finished=c.finish_reason == "stop",
                           num_tokens=out.usage.completion_tokens if n == 1 else
                           len(self._tokenizer(c.text, add_special_tokens=False).input_ids))
                for c in sorted(out.choices, key=lambda c: c.index)]
        return gens * params.n if n == 1 else gens

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[dict[str, Any]]:
        """One answer token by token (see `ModelServer.stream`): {"prompt_tokens"}, {"text"}..., {"generation"}."""
        try:
            ids = self._prompt(messages, params)
        except APIError as e:
            yield e.to_payload()
            return
        yield {"prompt_tokens": len(ids)}
        pieces, finish, completion_tokens = [], None, None
        try:
            async for batch in await self.completions(self._request(ids, params, n=1, stream=True)):
                for item in batch if isinstance(batch, list) else [batch]:
                    if not isinstance(item, str):
                        raise _engine_error(item)
                    for event in _events(item):
                        for choice in event.get("choices") or []:
                            if choice.get("text"):
                                pieces.append(choice["text"])
                                yield {"text": choice["text"]}
                            finish = choice.get("finish_reason") or finish
                        if event.get("usage"):
                            completion_tokens = event["usage"]["completion_tokens"]
        except Exception as e:
            yield server_error(e).to_payload()
            return
        text = "".join(pieces)
        yield {"generation": Generation(text=text.strip(), finished=finish == "stop", num_tokens=completion_tokens
                                        or len(self._tokenizer(text, add_special_tokens=False).input_ids))}

    def _prompt(self, messages: list[dict], params: SamplingParams) -> list[int]:
        return checked_prompt_ids(self._tokenizer, messages, params, self._max_prompt_tokens, self._context)

    def _request(self, ids: list[int], params: SamplingParams, n: int, stream: bool) -> Any:
        from ray.serve.llm.openai_api_models import CompletionRequest

        model_id = serve.get_multiplexed_model_id()
        return CompletionRequest(
            model=model_id if model_id in self._adapters else self._llm_config.model_id, prompt=ids,
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, top_k=0,
            n=n, seed=params.seed, ignore_eos=not params.stop_at_eos, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))

    @staticmethod
    async def _first(items: Any) -> Any:
        async for item in items:
            return item
        raise RuntimeError("the engine returned no response")


def _events(chunk: str) -> list[dict[str, Any]]:
    """The JSON events of a server-sent-events chunk ("data: {...}\\n\\n", possibly several; "[DONE]" skipped)."""
    out = []
    for line in chunk.splitlines():
        data = line.removeprefix("data:").strip()
        if line.startswith("data:") and data and data != "[DONE]":
            event = json.loads(data)
            if "error" in event:
                raise _engine_error(event)
            out.append(event)
    return out


def _engine_error(response: Any) -> APIError:
    """vLLM's error response (or event) as our APIError: its 4xx stay the client's, anything else is a 500."""
    error = response.get("error") if isinstance(response, dict) else getattr(response, "error", None)
    info = error if isinstance(error, dict) else (error.model_dump() if error is not None else {})
    status = int(info.get("code") or 500) if str(info.get("code") or "").isdigit() else 500
    message = info.get("message") or str(response)
    return APIError(status if 400 <= status < 500 else 500, message,
                    code="invalid_value" if 400 <= status < 500 else "engine_error")
