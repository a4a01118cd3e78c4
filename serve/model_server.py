"""SERVER SIDE — the Serve app's model deployment: engines by model id, batched generation, streaming, health.

The request's `model` becomes Serve's multiplexed model id, so requests go to replicas that already hold that
model, and each replica loads engines on demand with `@serve.multiplexed` (least recently used evicted).
Non-streaming requests for one model are merged by `@serve.batch` into one left-padded `engine.generate` call per
distinct sampling setting while several arrive; a lone request goes straight to the engine. Streaming requests
use the transformers engine's `stream` (a background `generate` with a text streamer); engines without one
(vLLM's offline `LLM`) answer with one engine call and send the whole answer as one chunk — NOT token-by-token
on vLLM yet.
"""

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray import serve

from ksg_ray.engines import Engine, Generation, SamplingParams, build_engine, prompt_ids
from ksg_ray.serve.config import ServeAppConfig
from ksg_ray.serve.openai_protocol import (
    APIError,
)

__all__ = ["LoadGauge", "ModelServer", "checked_prompt_ids", "server_error"]

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in each replica's log with the request id

# Consecutive engine failures (after a request passed every check) that mark a replica broken, so Serve
# replaces it; a single failure may be transient (e.g. an out-of-memory batch).
_FAILURES_BEFORE_UNHEALTHY = 3

# A prompt up to this many characters (about 600 tokens) is tokenized on the replica's event loop: it takes ~0.2 ms,
# and handing it to a thread and back added ~0.5 ms to a lone request (2-core box). Longer ones go to a thread, so
# a large prompt never stalls the loop.
_INLINE_CHECK_CHARS = 2500


class LoadGauge:
    """Whether a replica is under load: have two or more other requests arrived within the last cycle?

    A fixed batch wait costs a lone client its full length on every request (+96 ms p50 at 0.1 s); with no wait
    at all, 16 clients whose answers just came back miss the next batch (half the throughput). A cycle is one
    engine call plus the batch wait: a lone sequential client has one earlier arrival in it (its own last
    request), several clients have several, so only they get the wait.
    """

    def __init__(self, wait_s: float, cycle_s: float = 0.0) -> None:
        self.wait_s = wait_s
        self.cycle_s = cycle_s  # the last engine call's duration
        self.arrivals: deque[float] = deque(maxlen=256)

    def arrived(self, n: int = 1, now: float | None = None) -> bool:
        """Note `n` new requests; True when they should wait for more (several requests in flight or arriving)."""
        now = time.monotonic() if now is None else now
        window = 1.5 * (self.cycle_s + self.wait_s)
        recent = sum(1 for t in self.arrivals if now - t <= window)
        self.arrivals.extend([now] * n)
        return n > 1 or recent >= 2

    def engine_call(self, seconds: float) -> None:
        self.cycle_s = seconds


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
        self._load = LoadGauge(cfg.batching.batch_wait_timeout_s)
        self._engine_lock = asyncio.Lock()  # one engine call at a time: a lone request's or a batch's
        self._engine_free = asyncio.Event()
        self._engine_free.set()

    async def generate(self, prompts: list[list[dict]], params: SamplingParams) -> dict[str, Any]:
        """`params.n` answers per prompt, for the model id this request was routed with.

        Returns:
            {"prompt_tokens": total, "generations": [[Generation, ...] per prompt], "engine_s": the longest
            engine call that answered them (the ingress reports it as `Server-Timing`)}, or an error payload.
        """
        try:
            engine = await self._engine()
            counts = [await self._check_prompt(engine, p, params) for p in prompts]
            # A lone request goes straight to the engine (past @serve.batch's queue: ~0.6 ms less here); a batch
            # waits for more only while other requests are arriving.
            busy = self._load.arrived(len(prompts))
            if not busy:  # one prompt, nothing else arriving
                gens, seconds = await self._run_engine(engine, prompts, params)
                return {"prompt_tokens": sum(counts), "generations": gens, "engine_s": seconds}
            # Under load, a request that arrives while a batch runs joins the next batch once the engine is free.
            # Queued at once, it would start that batch alone, and the batch's other requests (sent as their
            # answers came back) would wait for it: one client ran a batch of its own every cycle (15 + 1 of 16),
            # a third of the engine's time.
            await self._engine_free.wait()
            answered = await asyncio.gather(*(self._generate_batch((p, params)) for p in prompts))
        except Exception as e:
            return server_error(e).to_payload()
        return {"prompt_tokens": sum(counts), "generations": [gens for gens, _ in answered],
                "engine_s": max(seconds for _, seconds in answered)}

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[dict[str, Any]]:
        """One answer as it is generated: {"prompt_tokens"} first (or an error payload, and nothing more), then
        {"text": piece} items, then {"generation": Generation}; an error mid-way ends it with an error payload."""
        try:
            engine = await self._engine()
            prompt_tokens = await self._check_prompt(engine, messages, params)
        except Exception as e:
            yield server_error(e).to_payload()
            return
        yield {"prompt_tokens": prompt_tokens}
        if not hasattr(engine, "stream"):  # vLLM's offline engine: the whole answer as one piece
            try:
                gen = (await self._run_engine(engine, [messages], params))[0][0][0]
            except Exception as e:
                yield server_error(e).to_payload()
                return
            yield {"text": gen.text}
            yield {"generation": gen}
            return
        try:
            async for item in _drive_in_thread(engine.stream(messages, params)):
                yield {"generation": item} if isinstance(item, Generation) else {"text": item}
        except Exception as e:
            self._note_engine_failure(e, engine)
            yield server_error(e).to_payload()
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
    async def _generate_batch(self, items: list[tuple[list[dict], SamplingParams]]
                              ) -> list[tuple[list[Generation], float]]:
        """Requests for one model (Serve splits batches by multiplexed model id), one engine call per setting;
        each request's answers with the seconds of the engine call that made them."""
        model_id = serve.get_multiplexed_model_id()
        engine = await self.engine_for(model_id)
        logger.debug("batch of %d request(s) for %r", len(items), model_id)
        groups: dict[SamplingParams, list[int]] = defaultdict(list)
        for i, (_, params) in enumerate(items):
            groups[params].append(i)
        out: list[tuple[list[Generation], float]] = [([], 0.0) for _ in items]
        for params, rows in groups.items():
            gens, seconds = await self._run_engine(engine, [items[i][0] for i in rows], params)
            for i, g in zip(rows, gens, strict=True):
                out[i] = (g, seconds)
        return out

    async def _run_engine(self, engine: Engine, prompts: list[list[dict]], params: SamplingParams
                          ) -> tuple[list[list[Generation]], float]:
        """One `engine.generate` call in a thread, once the engine is free; its answers and its seconds."""
        async with self._engine_lock:
            self._engine_free.clear()
            started = time.monotonic()
            try:
                gens = await asyncio.to_thread(engine.generate, prompts, params)
                seconds = time.monotonic() - started
            except Exception as e:
                self._note_engine_failure(e, engine)
                raise
            finally:
                self._engine_free.set()
        self._load.engine_call(seconds)
        self._failures = 0
        return gens, seconds

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
        args = (engine.tokenizer, messages, params, self.cfg.limits.max_prompt_tokens, _context_length(engine))
        if sum(len(str(m.get("content") or "")) for m in messages) <= _INLINE_CHECK_CHARS:
            return len(checked_prompt_ids(*args))
        return len(await asyncio.to_thread(checked_prompt_ids, *args))

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


def checked_prompt_ids(tokenizer: Any, messages: list[dict], params: SamplingParams, max_prompt_tokens: int,
                       context: int | None) -> list[int]:
    """Our chat format's prompt tokens; a malformed prompt, one over `max_prompt_tokens`, or one whose answer
    budget does not fit the model's context is refused (400). Shared by both model deployments.

    Raises:
        APIError: the refusal, in OpenAI's error shape.
    """
    try:
        ids = prompt_ids(tokenizer, messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from e
    n = len(ids)
    if n > max_prompt_tokens:
        raise APIError(400, f"the prompt is {n} tokens (chat template included); this server takes at most "
                            f"{max_prompt_tokens}", param="messages", code="context_length_exceeded")
    if context is not None and n + params.max_new_tokens > context:
        raise APIError(400, f"the prompt ({n} tokens) plus max_tokens ({params.max_new_tokens}) exceeds the "
                            f"model's context of {context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return ids


def server_error(e: Exception) -> APIError:
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
