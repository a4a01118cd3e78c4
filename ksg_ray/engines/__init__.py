"""One generation contract over vLLM and transformers, so every stage runs on a GPU cluster or a laptop.

The client draws candidate answers (reward training) and the server synthesises data with the same calls;
which library does the work is a deployment choice (`build_engine(kind=...)`), not a code path in the stages.
Prompts are chat message lists rendered by the tokenizer's own chat template with the assistant header added,
exactly as training rendered them (`ksg_ray.common.chat_format.prompt_text`), so a fine-tuned model is asked in the
format it learned.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["CONTINUE_KEY", "ENGINE_KINDS", "Engine", "Generation", "SamplingParams", "build_engine", "check_messages",
           "encode", "prompt_ids", "render_prompt", "score_inputs", "shared_engines"]

ENGINE_KINDS = ("transformers", "vllm", "auto")
_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ksg_shared_engines", default=None)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; the same meaning on every engine.

    Args:
        temperature: 0.0 means greedy decoding (deterministic; `n` copies of one answer).
        top_p: nucleus sampling mass; 1.0 keeps the whole distribution. Top-k is always off, so both engines
            sample from the same distribution (transformers would otherwise apply its default top_k=50).
        max_new_tokens: generation budget per answer; an answer cut here is reported as not finished.
        n: answers per prompt.
        seed: makes sampling repeatable. vLLM seeds each request; transformers seeds one stream per `generate`
            call, so there a sample also depends on its batch-mates. For samples that depend only on their own
            prompt, pass per-prompt `seeds` to `Engine.generate` (both engines honour them).
        stop_at_eos: stop at the end-of-turn token; False generates `max_new_tokens` (throughput tests).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    n: int = 1
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be a positive integer, got {self.n}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Generation:
    """One answer.

    Attributes:
        text: the decoded answer without special tokens, stripped.
        finished: it ended with an end-of-turn token; False = cut by `max_new_tokens` (RewardDS keeps only
            finished answers).
        num_tokens: tokens generated, the end-of-turn token included.
    """

    text: str
    finished: bool
    num_tokens: int


@runtime_checkable
class Engine(Protocol):
    """What every stage needs from a model: sample answers, and score given answers.

    Attributes:
        tokenizer: the model's Hugging Face tokenizer (chat template, token counts).
    """

    tokenizer: Any

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """`params.n` answers for each chat prompt, in prompt order.

        `seeds`: one per prompt; a prompt's samples then depend only on its prompt and its seed, not on the batch
        it shares (what makes a seeded synthesis give the same rows on a rerun, however Ray batches them).
        """
        ...

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """Mean log-probability per answer token of each answer as the assistant reply to its prompt.

        Perplexity is `exp(-score)`. Only the answer's own tokens count (not the end-of-turn token the
        template would add), so answers cut by `max_new_tokens` are scored on the same footing as finished
        ones. An empty answer has no tokens and scores NaN.
        """
        ...


def build_engine(kind: str, model_path: str, adapter_path: str | None = None, **kw: Any) -> Engine:
    """Load a model (plus an optional LoRA adapter) behind the `Engine` contract.

    Args:
        kind: "transformers", "vllm", or "auto" (vLLM when CUDA is available and vllm is installed, else
            transformers: vLLM is the fast path on GPUs, transformers works everywhere); "openai" for a model
            on an OpenAI-compatible server (`OpenAIEndpointEngine`: generation only, model_path = its id).
        model_path: a local model folder or hub id (see `ksg_ray.common.hub.resolve_model`).
        adapter_path: a peft adapter folder (what the client sends), or None for the base model.
        **kw: engine options (`TransformersEngine`: device, dtype, batch_size; `VLLMEngine`: `vllm.LLM` args).

    Returns:
        The engine, loaded and ready.

    Raises:
        ValueError: `kind` is not one of `ENGINE_KINDS`.
        ImportError: `kind="vllm"` without vllm installed.

    Examples:
        >>> engine = build_engine("auto", resolve_model("smollm2-135m"))
        >>> engine.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=16))
    """
    cache = _SHARED.get()
    key = (kind, model_path, adapter_path, repr(sorted(kw.items())))
    if cache is not None and key in cache:
        return cache[key]
    engine = _build_engine(kind, model_path, adapter_path, **kw)
    if cache is not None:
        cache[key] = engine
    return engine


@contextlib.contextmanager
def shared_engines() -> Iterator[None]:
    """Within it, `build_engine` with the same arguments returns the same engine, so the steps of one actor that
    use one model (`StepChain`: the professional's judge and answers; the generator's answers and its
    perplexity scores) load it once."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _build_engine(kind: str, model_path: str, adapter_path: str | None, **kw: Any) -> Engine:
    if kind == "openai":  # a served model (`professional.endpoint`): model_path is its id; no adapter
        from ksg_ray.engines.openai_engine import OpenAIEndpointEngine

        if adapter_path is not None:
            raise ValueError("an OpenAI endpoint serves its own models: pick the adapter by its model id instead")
        return OpenAIEndpointEngine(model_path, **kw)
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r} is not one of {ENGINE_KINDS}; use 'auto' to pick by hardware")
    if kind == "auto":
        kind = "vllm" if _cuda_available() and importlib.util.find_spec("vllm") is not None else "transformers"
    if kind == "vllm":
        from ksg_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, adapter_path, **kw)
    from ksg_ray.engines.transformers_engine import TransformersEngine

    return TransformersEngine(model_path, adapter_path, **kw)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Check one chat prompt and return it as plain dicts.

    Chat templates render a missing or None `content` as the text "None" instead of failing, so a malformed
    row would silently become a prompt; it is rejected here instead, before any engine sees it.

    Raises:
        ValueError: not a non-empty list of {"role": str, "content": str} mappings.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"a prompt must be a non-empty list of chat messages, got {type(messages).__name__}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i}: 'role' must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}")
        checked.append(dict(m))
    return checked


CONTINUE_KEY = "continue"  # on the last message: generate the rest of *that* message (e.g. a user's question)
_CUT = "\x1eksg-continue\x1e"


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt text: the chat template with the assistant header, as `chat_format.prompt_text` renders it.

    A last message marked `{"continue": True}` is left open instead: the prompt ends with its content, so the
    model writes the rest of it (how the server samples a question from a generator trained with a question loss).
    """
    messages = check_messages(messages)
    if not messages[-1].get(CONTINUE_KEY):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    last = messages[-1]
    opened = [*messages[:-1], {"role": last["role"], "content": _CUT}]
    text = tokenizer.apply_chat_template(opened, add_generation_prompt=False, tokenize=False)
    if _CUT not in text:
        raise ValueError("this chat template does not render a message's content verbatim: it cannot be continued")
    return text[:text.index(_CUT)] + last["content"]


# A fast tokenizer keeps its padding setting in shared Rust state that every call rewrites: a padded batch
# encoded while another thread encodes one unpadded prompt comes back ragged ("Unable to create tensor").
# Serve tokenises on several threads at once (batched generation, streams, prompt-length checks).
_ENCODE_LOCK = threading.Lock()


def encode(tokenizer: Any, texts: str | list[str], **kwargs: Any) -> Any:
    """`tokenizer(texts, add_special_tokens=False, **kwargs)`, safe to call from several threads at once."""
    with _ENCODE_LOCK:
        return tokenizer(texts, add_special_tokens=False, **kwargs)


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of `render_prompt`; the template already holds any BOS, so none is added."""
    return encode(tokenizer, render_prompt(tokenizer, messages))["input_ids"]


def score_inputs(tokenizer: Any, prompts: list[list[dict]], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per pair, the shared input of every engine's `score`.

    Raises:
        ValueError: `prompts` and `answers` differ in length, or a prompt is malformed.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"score needs one answer per prompt, got {len(prompts)} prompts, {len(answers)} answers")
    return [(prompt_ids(tokenizer, p), encode(tokenizer, a)["input_ids"])
            for p, a in zip(prompts, answers, strict=True)]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
