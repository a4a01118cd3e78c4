"""SERVER SIDE — the Serve app's ingress: the OpenAI protocol over HTTP, and every check a request can fail.

`OpenAIIngress` (FastAPI) checks bearer-token auth, the body-size cap (before any parsing), strict parsing and
limits, and the model id (404). A malformed or hostile request is answered here with an OpenAI-style error; only
the prompt's token count is checked on the model replica, which holds the tokenizer (a refusal there is a 400 as
well). Streams are relayed as server-sent events in OpenAI's chunk format.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures through Serve's class-based
# view, where string annotations such as "Request" would not resolve (the route would expect a query parameter).
import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ksg_ray.engines import Generation, SamplingParams
from ksg_ray.serve.config import ServeAppConfig
from ksg_ray.serve.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    error_body,
    finish_reason,
    model_card,
    new_request_id,
    parse_request,
    usage,
)

__all__ = ["OpenAIIngress", "api", "read_body"]

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in each replica's log with the request id

api = FastAPI(title="ksg-ray", description="OpenAI-compatible API of the distilled model",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) in OpenAI's error shape too."""
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                   "invalid_request_error" if exc.status_code < 500 else "server_error"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Bodies are parsed by the routes themselves; this only catches a malformed path or query, as a 400."""
    return JSONResponse(error_body(f"{request.method} {request.url.path}: invalid request", "invalid_request_error",
                                   code="invalid_value"), status_code=400)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, before anything parses it.

    Raises:
        APIError: 413 when the declared or the received size exceeds `limit`; 400 for a bad Content-Length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"bad Content-Length header {declared[:32]!r}", code="invalid_value")
        if int(declared) > limit:
            raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _result(payload: dict[str, Any]) -> dict[str, Any]:
    """A model-replica answer, or its error raised as `APIError`."""
    if "error" in payload:
        raise APIError.from_payload(payload)
    return payload


def _server_timing(payload: dict[str, Any]) -> dict[str, str] | None:
    """The engine's time on this request as a W3C `Server-Timing` header (`engine;dur=<ms>`), so a client or a
    benchmark can tell the serving layer's own share of the latency from the model's, in the same process."""
    if "engine_s" not in payload:  # ray.serve.llm's deployment does not report it
        return None
    return {"Server-Timing": f"engine;dur={payload['engine_s'] * 1000:.1f}"}


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """The HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`.

    Args:
        cfg: the app config (model ids, limits, auth).
        model_server: handle to the `ModelServer` deployment.

    Raises:
        RuntimeError: at start, when `auth.token_env` names an unset variable (never serve open by accident).
    """

    def __init__(self, cfg: ServeAppConfig, model_server: DeploymentHandle) -> None:
        self.cfg = cfg
        # Calls to the model replicas go by value over Serve's gRPC data plane rather than as Ray actor calls:
        # 1.2 ms less per request here, and what Ray's throughput-optimized mode does between replicas.
        self.model_server = model_server.options(_by_reference=False)
        self._token = cfg.auth.resolve_token()
        self._created = int(time.time())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 when a model replica answers its health check, else 503 (load balancers poll this; no auth)."""
        try:
            await asyncio.wait_for(self.model_server.check_health.remote(), timeout=30)
        except Exception as e:
            return JSONResponse(error_body(f"model replica unhealthy: {type(e).__name__}: {e}", "server_error",
                                           code="unhealthy"), status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        async def answer() -> Response:
            return JSONResponse({"object": "list",
                                 "data": [model_card(m, self._created) for m in self.cfg.models]})

        return await self._answer(request, answer)

    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, request: Request, model_id: str) -> Response:
        async def answer() -> Response:
            self._check_model(model_id)
            return JSONResponse(model_card(model_id, self._created))

        return await self._answer(request, answer)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        async def answer() -> Response:
            req = parse_request(ChatCompletionRequest, await read_body(request, self.cfg.limits.max_body_bytes))
            self._check_model(req.model)
            params = req.sampling_params(self.cfg.limits)
            messages = req.engine_messages()
            handle = self.model_server.options(multiplexed_model_id=req.model)
            if req.stream:
                return await self._stream(handle, messages, params, req.model, req.include_usage, chat=True)
            out = _result(await handle.generate.remote([messages], params))
            return JSONResponse(chat_completion(new_request_id("chatcmpl"), req.model, out["generations"][0],
                                                out["prompt_tokens"]), headers=_server_timing(out))

        return await self._answer(request, answer)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def answer() -> Response:
            req = parse_request(CompletionRequest, await read_body(request, self.cfg.limits.max_body_bytes))
            self._check_model(req.model)
            prompts = req.prompts()
            params = req.sampling_params(self.cfg.limits, num_prompts=len(prompts))
            handle = self.model_server.options(multiplexed_model_id=req.model)
            if req.stream:
                return await self._stream(handle, prompts[0], params, req.model, req.include_usage, chat=False)
            out = _result(await handle.generate.remote(prompts, params))
            return JSONResponse(completion(new_request_id("cmpl"), req.model, out["generations"],
                                           out["prompt_tokens"]), headers=_server_timing(out))

        return await self._answer(request, answer)

    async def _answer(self, request: Request, handler) -> Response:
        """Auth, then the handler; every failure becomes an OpenAI error body (a 5xx only for server faults)."""
        try:
            self._authorize(request)
            return await handler()
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, request.url.path)
            return JSONResponse(error_body("internal server error (see the server log)", "server_error"),
                                status_code=500)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(value.strip().encode(), self._token.encode()):
            raise APIError(401, "invalid bearer token", code="invalid_api_key")

    def _check_model(self, model: str) -> None:
        if model not in self.cfg.models:
            raise APIError(404, f"the model {model!r} does not exist; this server has {sorted(self.cfg.models)}",
                           param="model", code="model_not_found")

    async def _stream(self, handle: DeploymentHandle, messages: list[dict], params: SamplingParams, model: str,
                      include_usage: bool, chat: bool) -> Response:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

        The first item from the replica is awaited before answering, so a request refused there (a prompt over
        the token limit) still gets its 4xx status instead of a 200 stream carrying an error.
        """
        items = handle.options(stream=True).stream.remote(messages, params)
        try:
            first = await items.__anext__()
            _result(first)
        except BaseException:
            items.cancel()
            raise
        prompt_tokens = first["prompt_tokens"]
        request_id, created = new_request_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def chunk(text: str | None, finish: str | None = None, counts: dict[str, int] | None = None) -> str:
            if chat:
                delta = None if text is None else ({} if finish else {"content": text})
                return _sse(chat_chunk(request_id, model, created, delta, finish, counts))
            return _sse(completion_chunk(request_id, model, created, text, finish, counts))

        async def events() -> AsyncIterator[str]:
            done = False
            try:
                if chat:
                    yield _sse(chat_chunk(request_id, model, created, {"role": "assistant", "content": ""}))
                final: Generation | None = None
                async for item in items:
                    if "text" in item:
                        yield chunk(item["text"])
                    elif "generation" in item:
                        final = item["generation"]
                    else:
                        _result(item)
                done = True
                yield chunk("", finish_reason(final))
                if include_usage:
                    yield chunk(None, counts=usage(prompt_tokens, final.num_tokens))
            except APIError as e:
                yield _sse(e.body())
            except Exception:
                logger.exception("stream of %s failed", request_id)
                yield _sse(error_body("internal server error during streaming", "server_error"))
            finally:
                if not done:
                    items.cancel()  # the client went away or the stream failed: stop generating
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
