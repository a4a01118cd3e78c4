"""SERVER SIDE — the OpenAI wire format: request models with their checks, response bodies, and errors.

Requests are parsed strictly (pydantic strict mode on the raw JSON): `"16"` is not an integer and `true` is not
a count, as on OpenAI's API; unknown fields are refused by name rather than silently ignored. OpenAI fields the
engines cannot honour (stop sequences, penalties, logprobs) are accepted only at their neutral values, so a
client never gets an answer computed differently from what it asked for. Every error, whatever raised it, leaves
as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ksg_ray.engines import Generation, SamplingParams
from ksg_ray.serve.config import LimitsSection

__all__ = ["APIError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "chat_chunk",
           "chat_completion", "completion", "completion_chunk", "error_body", "finish_reason", "model_card",
           "new_request_id", "parse_request", "usage"]


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raised anywhere, answered as OpenAI's JSON."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_payload(self) -> dict[str, Any]:
        """A plain dict that crosses a Serve handle (exceptions would arrive wrapped in Ray's error types)."""
        return {"status": self.status, "error": self.body()["error"]}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> APIError:
        e = payload["error"]
        return cls(payload["status"], e["message"], type=e["type"], param=e["param"], code=e["code"])


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="accepted for compatibility; the chat template has no names")

    def engine_message(self) -> dict[str, str]:
        """The {role, content} dict the engines take; `developer` is OpenAI's newer name for `system`."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Accepted only at their neutral values (see `_refuse_unsupported`).
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: Any = None

    def sampling_params(self, limits: LimitsSection, num_prompts: int = 1) -> SamplingParams:
        """Engine sampling for this request, with OpenAI's defaults (temperature 1, top_p 1, n 1).

        Raises:
            APIError: 400 for an unsupported field or a value over the server's limits.
        """
        self._refuse_unsupported()
        max_tokens = self._max_tokens()
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        n = 1 if self.n is None else self.n
        if n * num_prompts > limits.max_choices:
            raise APIError(400, f"n × prompts = {n * num_prompts} answers; this server gives at most "
                                f"{limits.max_choices} per request", param="n", code="invalid_value")
        if self.stream and n > 1:
            raise APIError(400, "stream supports n=1 only", param="n", code="invalid_value")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
            n=n, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _refuse_unsupported(self) -> None:
        if self.stop:
            raise APIError(400, "stop sequences are not supported by this server (answers end at the model's "
                                "end-of-turn token or max_tokens)", param="stop", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name,
                               code="unsupported_parameter")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options", code="invalid_value")


R = TypeVar("R", bound=_SamplingRequest)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    def engine_messages(self) -> list[dict[str, str]]:
        return [m.engine_message() for m in self.messages]

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    """A text completion. The served models are chat models: each prompt is asked as one user message through
    the chat template (the format they were fine-tuned on), not continued as raw text."""

    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[list[dict[str, str]]]:
        texts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return [[{"role": "user", "content": t}] for t in texts]

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported by this server (only 1)", param="best_of",
                           code="unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix",
                           code="unsupported_parameter")
        if isinstance(self.prompt, list) and self.stream and len(self.prompt) > 1:
            raise APIError(400, "stream supports one prompt only", param="prompt", code="invalid_value")


def parse_request(kind: type[R], body: bytes) -> R:
    """Parse and check a raw JSON body.

    Raises:
        APIError: 400 naming the first bad field (or saying the body is not JSON).
    """
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise APIError(400, "the request body must be a JSON object", code="invalid_json") from None
        param = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            message = f"missing required parameter: {param}"
        else:
            message = f"invalid value for {param}: {err['msg']}"
        if len(e.errors()) > 1:
            message += f" (and {len(e.errors()) - 1} more problem(s))"
        raise APIError(400, message, param=param, code="invalid_value") from None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(gen: Generation) -> str:
    """OpenAI's reason: "stop" = ended with the end-of-turn token, "length" = cut at max_tokens."""
    return "stop" if gen.finished else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, gens: list[Generation], prompt_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                "finish_reason": finish_reason(g)} for i, g in enumerate(gens)]
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, sum(g.num_tokens for g in gens))}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, str] | None,
               finish: str | None = None, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` is the usage-only chunk (no choices) of `include_usage`."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def completion(request_id: str, model: str, gens_per_prompt: list[list[Generation]],
               prompt_tokens: int) -> dict[str, Any]:
    flat = [g for gens in gens_per_prompt for g in gens]
    choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": finish_reason(g)}
               for i, g in enumerate(flat)]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, sum(g.num_tokens for g in flat))}


def completion_chunk(request_id: str, model: str, created: int, text: str | None, finish: str | None = None,
                     usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed `text_completion`; `text=None` is the usage-only chunk."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ksg-ray"}
