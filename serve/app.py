"""SERVER SIDE — the Ray Serve app: an OpenAI-compatible HTTP API in front of the distilled model(s).

Two deployments:

- `OpenAIIngress` (FastAPI) checks what a request can get wrong: bearer-token auth, the body-size cap
  (before any parsing), strict parsing and limits, the model id (404). A malformed or hostile request is
  answered here with an OpenAI-style error; only the prompt's token count is checked on the model replica,
  which holds the tokenizer (a refusal there is a 400 as well).
- `ModelServer` holds the engines. The request's `model` becomes Serve's multiplexed model id, so requests go
  to replicas that already hold that model, and each replica loads engines on demand with `@serve.multiplexed`
  (least recently used evicted). Non-streaming requests for one model are merged by `@serve.batch` into one
  left-padded `engine.generate` call per distinct sampling setting. Streaming requests use the transformers
  engine's `stream` (a background `generate` with a text streamer); engines without one (vLLM's offline
  `LLM`) answer through the batch and send the whole answer as one chunk — NOT token-by-token on vLLM yet.

GPU: `engine.kind: vllm` builds `VLLMEngine` per model id (vllm is imported only then). That path has not been
run (no GPU here); on GPUs, `ray.serve.llm.build_openai_app` (one vLLM engine, LoRA per request) is the
alternative when many adapters share one base.

Start it with `ksg serve MODEL_DIR`, `serve run serve/config.yaml`, or `serve.run(build_app({...}))`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures through Serve's class-based
# view, where string annotations such as "Request" would not resolve (the route would expect a query parameter).
import asyncio
import hmac
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ksg_ray.engines import Engine, Generation, SamplingParams, build_engine, prompt_ids
from ksg_ray.serve.config import ServeAppConfig, parse_app_config
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

__all__ = ["ModelServer", "OpenAIIngress", "build_app", "read_body"]

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in each replica's log with the request id

# Consecutive engine failures (after a request passed every check) that mark a replica broken, so Serve
# replaces it; a single failure may be transient (e.g. an out-of-memory batch).
_FAILURES_BEFORE_UNHEALTHY = 3

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
        self.model_server = model_server
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
                                                out["prompt_tokens"]))

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
                                           out["prompt_tokens"]))

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


@serve.deployment
class ModelServer:
    """Engines by model id, batched generation, streaming, and a health check.

    Methods return plain dicts (`{"error": ..., "status": ...}` for a refused request) rather than raising, so
    the ingress gets the OpenAI error itself and not an exception wrapped by Ray.

    Args:
        cfg: the app config (models, engine, batching, limits).
    """

    def __init__(self, cfg: ServeAppConfig) -> None:
        self.cfg = cfg
        self._broken: str | None = None
        self._failures = 0

        async def load_engine(model_id: str) -> Engine:
            return await self._load_engine(model_id)

        # Wired at init so max_num_models_per_replica comes from the config (Serve detects it on the instance).
        self.engine_for = serve.multiplexed(max_num_models_per_replica=cfg.engine.max_models_per_replica)(
            load_engine)
        self._generate_batch.set_max_batch_size(cfg.batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

    async def generate(self, prompts: list[list[dict]], params: SamplingParams) -> dict[str, Any]:
        """`params.n` answers per prompt, for the model id this request was routed with.

        Returns:
            {"prompt_tokens": total, "generations": [[Generation, ...] per prompt]}, or an error payload.
        """
        try:
            engine = await self._engine()
            counts = await asyncio.gather(*(self._check_prompt(engine, p, params) for p in prompts))
            gens = await asyncio.gather(*(self._generate_batch((p, params)) for p in prompts))
        except Exception as e:
            return _server_error(e).to_payload()
        return {"prompt_tokens": sum(counts), "generations": gens}

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[dict[str, Any]]:
        """One answer as it is generated: {"prompt_tokens"} first (or an error payload, and nothing more), then
        {"text": piece} items, then {"generation": Generation}; an error mid-way ends it with an error payload."""
        try:
            engine = await self._engine()
            prompt_tokens = await self._check_prompt(engine, messages, params)
        except Exception as e:
            yield _server_error(e).to_payload()
            return
        yield {"prompt_tokens": prompt_tokens}
        if not hasattr(engine, "stream"):  # vLLM's offline engine: the whole answer as one piece
            try:
                gen = (await self._generate_batch((messages, params)))[0]
            except Exception as e:
                yield _server_error(e).to_payload()
                return
            yield {"text": gen.text}
            yield {"generation": gen}
            return
        try:
            async for item in _drive_in_thread(engine.stream(messages, params)):
                yield {"generation": item} if isinstance(item, Generation) else {"text": item}
        except Exception as e:
            self._note_engine_failure(e, engine)
            yield _server_error(e).to_payload()
            return
        self._failures = 0

    def check_health(self) -> None:
        """Serve's periodic health check: raising makes Serve replace this replica.

        Raises:
            RuntimeError: an engine raised one of its fatal errors (e.g. vLLM's EngineDeadError), or failed
                several requests in a row after they passed every check.
        """
        if self._broken is not None:
            raise RuntimeError(f"engine broken: {self._broken}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # real values set from the config in __init__
    async def _generate_batch(self, items: list[tuple[list[dict], SamplingParams]]) -> list[list[Generation]]:
        """Requests for one model (Serve splits batches by multiplexed model id), one engine call per setting."""
        model_id = serve.get_multiplexed_model_id()
        engine = await self.engine_for(model_id)
        logger.debug("batch of %d request(s) for %r", len(items), model_id)
        groups: dict[SamplingParams, list[int]] = defaultdict(list)
        for i, (_, params) in enumerate(items):
            groups[params].append(i)
        out: list[list[Generation]] = [[] for _ in items]
        for params, rows in groups.items():
            try:
                gens = await asyncio.to_thread(engine.generate, [items[i][0] for i in rows], params)
            except Exception as e:
                self._note_engine_failure(e, engine)
                raise
            for i, g in zip(rows, gens, strict=True):
                out[i] = g
        self._failures = 0
        return out

    async def _engine(self) -> Engine:
        model_id = serve.get_multiplexed_model_id()
        if model_id not in self.cfg.models:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        try:
            return await self.engine_for(model_id)
        except Exception as e:
            logger.exception("loading model %r failed", model_id)
            raise APIError(500, f"the model {model_id!r} could not be loaded: {type(e).__name__}: {e}",
                           code="model_unavailable") from e

    async def _load_engine(self, model_id: str) -> Engine:
        from ksg_ray.common.hub import model_dir_engine_args

        base, adapter = model_dir_engine_args(self.cfg.models[model_id])
        logger.info("loading model %r: %s%s", model_id, base, f" + adapter {adapter}" if adapter else "")
        return await asyncio.to_thread(build_engine, self.cfg.engine.kind, base, adapter,
                                       **self.cfg.engine.engine_kwargs)

    async def _check_prompt(self, engine: Engine, messages: list[dict], params: SamplingParams) -> int:
        """The prompt's token count, refused (400) past `limits.max_prompt_tokens` or the model's context."""
        try:
            n = len(await asyncio.to_thread(prompt_ids, engine.tokenizer, messages))
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from e
        limit = self.cfg.limits.max_prompt_tokens
        if n > limit:
            raise APIError(400, f"the prompt is {n} tokens (chat template included); this server takes at most "
                                f"{limit}", param="messages", code="context_length_exceeded")
        context = _context_length(engine)
        if context is not None and n + params.max_new_tokens > context:
            raise APIError(400, f"the prompt ({n} tokens) plus max_tokens ({params.max_new_tokens}) exceeds the "
                                f"model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return n

    def _note_engine_failure(self, e: Exception, engine: Engine) -> None:
        """Count a failed engine call towards the health check (a fatal engine error marks it broken at once)."""
        logger.error("engine failure: %s: %s", type(e).__name__, e, exc_info=e)
        self._failures += 1
        if isinstance(e, getattr(engine, "fatal_errors", ())) or self._failures >= _FAILURES_BEFORE_UNHEALTHY:
            self._broken = f"{type(e).__name__}: {e} ({self._failures} failure(s) in a row)"


async def _drive_in_thread(items: Iterator[Any]) -> AsyncIterator[Any]:
    """Run a blocking iterator in its own thread and hand its items to the event loop as they come.

    Leaving the `async for` early (the client went away: Serve cancels the request) tells the thread to close
    the iterator after its next item, which stops a streaming generation within one token. A thread of its own,
    not the shared executor, so long streams never starve the batch calls and tokenisation that use it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None, bool]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, error: BaseException | None = None, last: bool = False) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error, last))
        except RuntimeError:  # the event loop is gone (replica shutting down)
            pass

    def drive() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    break
        except BaseException as e:
            put(None, e, True)
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(None, None, True)

    threading.Thread(target=drive, name="ksg-serve-stream", daemon=True).start()
    try:
        while True:
            item, error, last = await queue.get()
            if error is not None:
                raise error
            if last:
                return
            yield item
    finally:
        stop.set()


def _server_error(e: Exception) -> APIError:
    """A refused request stays as it is; anything else is the server's fault (500), logged where it happened."""
    if isinstance(e, APIError):
        return e
    logger.error("request failed: %s: %s", type(e).__name__, e)
    return APIError(500, f"generation failed: {type(e).__name__}", code="engine_error")


def _context_length(engine: Engine) -> int | None:
    """The model's context window in tokens, where the engine exposes it."""
    model = getattr(engine, "model", None)  # transformers
    if model is not None:
        return getattr(model.config, "max_position_embeddings", None)
    llm = getattr(engine, "llm", None)  # vLLM
    try:
        return int(llm.llm_engine.model_config.max_model_len) if llm is not None else None
    except AttributeError:
        return None


def build_app(args: dict[str, Any] | ServeAppConfig) -> serve.Application:
    """The Serve application: ingress + model deployment, from a config (the `args:` of a Serve config file).

    Args:
        args: a `ServeAppConfig` or its fields as a dict (what `serve run`/`serve deploy` pass).

    Returns:
        The bound application, for `serve.run` or a Serve config's `import_path`.

    Raises:
        KsgConfigError: the config is invalid or a model entry is not a model dir (every problem listed).

    Examples:
        >>> serve.run(build_app({"models": {"ksg-distilled": "runs/finetune/round0/model"}}))
        >>> # serve run serve/config.yaml  (import_path: ksg_ray.serve.app:build_app)
    """
    cfg = args if isinstance(args, ServeAppConfig) else parse_app_config(args)
    cfg.check_model_dirs()
    model_server = ModelServer.options(
        autoscaling_config=cfg.autoscaling.serve_options(),
        max_ongoing_requests=cfg.ingress.model_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus},
    ).bind(cfg)
    return OpenAIIngress.options(
        num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
    ).bind(cfg, model_server)
