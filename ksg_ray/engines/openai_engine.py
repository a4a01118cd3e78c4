"""The professional model behind an OpenAI-compatible endpoint (vLLM's server, `ray.serve.llm`, `ksg serve`, a
hosted API), as an `Engine` for the stages that ask it: the judge, the answers, the critiques and rewrites.

On a cluster the strong model is often already served somewhere. What the server sends it are queries sampled
from the DP generator, so asking it is post-processing of a DP output, not a use of private data. Requests go
through the official `openai` client: `max_concurrency` at a time per actor, the client's own retries with
back-off on connection errors, 429 and 5xx, and a request that still fails is that row's error (reported in
`errors.jsonl` and retried by a rerun), never a dropped row. A wrong address, model or token fails the stage.

Two things an endpoint does not give: token-level scores of a given answer (chat APIs return log-probabilities
of what they generate, if at all), so `score` is refused and scoring stays on local models (the client's reward
model and the perplexity model); and the judge's P(yes) from logits, so the judge asks for a short greedy reply
and reads Yes (1.0) or No (0.0) from it (`yes_probability`); any other reply is that row's error.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ksg_ray.engines import Generation, SamplingParams, check_messages

__all__ = ["OpenAIEndpointEngine"]

_YES_NO = re.compile(r"^\W*(yes|no)\b", re.I)


class OpenAIEndpointEngine:
    """`model` on the OpenAI-compatible server at `base_url`.

    Args:
        model: the served model's id (what the server's /v1/models lists).
        base_url: e.g. http://127.0.0.1:8000/v1.
        api_key_env: the environment variable that holds the token (never the token itself, which would end up in
            configs and logs); None = no token (a local server without auth).
        max_concurrency: requests in flight at once from this actor.
        max_retries, timeout_s: per request, as the `openai` client takes them.
    """

    tokenizer = None  # prompts go as chat messages; the server applies its own template

    def __init__(self, model: str, *, base_url: str, api_key_env: str | None = None, max_concurrency: int = 8,
                 max_retries: int = 3, timeout_s: float = 120.0) -> None:
        import openai

        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"professional.endpoint.api_key_env: the environment variable {api_key_env} is not set")
        self.model, self.max_concurrency = model, max_concurrency
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ[api_key_env] if api_key_env else "none",
                                    max_retries=max_retries, timeout=timeout_s)
        # the endpoint itself is wrong: no row can succeed, so the stage fails instead of failing every row
        self.fatal_errors = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
        self.client.models.retrieve(model)  # fail at actor start on a wrong address, token or model id

    def _ask(self, messages: list[dict], params: SamplingParams, seed: int | None):
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": m["role"], "content": m["content"]} for m in check_messages(messages)],
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            seed=seed)

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """`params.n` answers per prompt; `finished` = the server's finish_reason is "stop"."""
        if not params.stop_at_eos:
            raise ValueError("an OpenAI endpoint stops at its end of turn: stop_at_eos=False is not available")

        def one(i: int) -> list[Generation]:
            reply = self._ask(prompts[i], params, seeds[i] if seeds is not None else params.seed)
            tokens = reply.usage.completion_tokens if reply.usage else 0
            return [Generation(text=(c.message.content or "").strip(), finished=c.finish_reason == "stop",
                               num_tokens=tokens // max(1, len(reply.choices))) for c in reply.choices]

        return self._map(one, list(range(len(prompts))))

    def yes_probability(self, prompts: list[list[dict]]) -> list[float]:
        """1.0 for a greedy reply that starts with Yes, 0.0 for No.

        Raises:
            ValueError: a reply that is neither (the batch's rows are then retried one by one, and the ones
                that still fail become row errors).
        """
        def one(messages: list[dict]) -> float:
            reply = self._ask(messages, SamplingParams(temperature=0.0, max_new_tokens=4), None)
            text = reply.choices[0].message.content or ""
            found = _YES_NO.match(text)
            if found is None:
                raise ValueError(f"the judge replied {text[:60]!r}, neither Yes nor No")
            return 1.0 if found.group(1).lower() == "yes" else 0.0

        return self._map(one, prompts)

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        raise NotImplementedError("an OpenAI endpoint cannot score given answers token by token: scoring "
                                  "(reward, perplexity) runs on local models")

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "model": self.model, "base_url": str(self.client.base_url)}
