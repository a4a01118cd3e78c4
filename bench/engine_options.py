"""Greedy generation with one transformers-engine option off and on, side by side in one process.

    python bench/engine_options.py [--option packed_linear|kv_cache|max_padding] [--kernel mkl|fp16|auto]
                                   [--model smollm2-135m] [--tokens 64] [--batches 1,16,32] [--threads 1,2]
                                   [--engine-batch N] [--score]

`packed_linear`: the decode steps' linear layers on a packed kernel (`ksg_ray/engines/packed_linear.py`; `--kernel`
mkl: MKL's packed sgemm, at every thread count; fp16: fbgemm's fp16-weight GEMM) vs plain sgemm;
`kv_cache`: the reserved KV cache (`ksg_ray/engines/kv_cache.py`) vs transformers' dynamic cache; `max_padding`:
prompts grouped by length (`length_batches`) vs the caller's order. Two `TransformersEngine`s of the same model, one
with the option off, generate greedy answers to the same medical dev questions (`--batches` of them per call,
`--engine-batch` per forward pass; the first whose prompt is `--min-prompt-tokens` to `--max-prompt-tokens` long:
one 945-token question pads a whole batch in the caller's order; `stop_at_eos=False` so both generate the same token
count), alternating so drift hits both alike. It prints tokens/s per engine, the ratio, and how many answers are
identical; with `--score`, also the time to score the questions' reference answers and the largest score difference.
Run it with MKL's Intel path (`eval "$(python -m ksg_ray.common.cpu_blas)"`), as `ksg` runs. For `max_padding`, give
the dev questions as they come: `--option max_padding --batches 48 --engine-batch 16 --max-prompt-tokens 4096
--score`; and a case where one more batch would cost more than its padding: `--option max_padding --data
../shared/data/medical/train.jsonl --min-prompt-tokens 100 --max-prompt-tokens 200 --batches 16 --tokens 256`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# --option: the engine's argument, and its value when off
OPTIONS = {"packed_linear": ("packed_linear", None), "kv_cache": ("reserve_kv_cache", False),
           "max_padding": ("max_padding", None)}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical" / "dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--option", choices=list(OPTIONS), default="packed_linear")
    ap.add_argument("--kernel", choices=["mkl", "fp16", "auto"], default="mkl", help="packed_linear's kernel")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    ap.add_argument("--min-prompt-tokens", type=int, default=0)
    ap.add_argument("--engine-batch", type=int, default=None, help="rows per forward pass (default: max --batches)")
    ap.add_argument("--score", action="store_true", help="also time scoring the reference answers")
    a = ap.parse_args()

    import torch

    from ksg_ray.common.chat_format import build_messages
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records
    from ksg_ray.engines import SamplingParams, packed_linear, prompt_ids
    from ksg_ray.engines.transformers_engine import TransformersEngine

    on = {}
    if a.option == "packed_linear":
        on = {"packed_linear": a.kernel}
        packed_linear.PACK_ON_SEVERAL_THREADS = True  # mkl's packed path at every thread count: what is measured
    batches = [int(b) for b in a.batches.split(",")]
    path = resolve_model(a.model)
    argument, off = OPTIONS[a.option]
    engine_batch = a.engine_batch or max(batches)
    engines = {"off": TransformersEngine(path, batch_size=engine_batch, **{argument: off}),
               "on": TransformersEngine(path, batch_size=engine_batch, **on)}
    records = [r for r in load_records(a.data) if a.min_prompt_tokens
               <= len(prompt_ids(engines["off"].tokenizer, build_messages(r)[:-1])) <= a.max_prompt_tokens]
    records = records[:max(batches)]
    prompts = [build_messages(r)[:-1] for r in records]
    params = SamplingParams(max_new_tokens=a.tokens, stop_at_eos=False)
    for engine in engines.values():
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    lengths = [len(prompt_ids(engines["off"].tokenizer, m)) for m in prompts]
    what = f"{a.option} ({a.kernel})" if a.option == "packed_linear" else a.option
    print(f"{a.model}, fp32, greedy, {a.tokens} new tokens per answer, prompts of {min(lengths)}-{max(lengths)} "
          f"tokens, torch {torch.__version__}; {what} off vs on")
    print(f"{'threads':>7} {'batch':>5} {'off tok/s':>10} {'on tok/s':>9} {'ratio':>6}  same answers")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in batches:
            seconds, answers = {k: 0.0 for k in engines}, {}
            for _ in range(a.rounds):
                for name, engine in engines.items():
                    t0 = time.perf_counter()
                    answers[name] = [g[0].text for g in engine.generate(prompts[:batch], params)]
                    seconds[name] += time.perf_counter() - t0
            rate = {k: a.rounds * batch * a.tokens / s for k, s in seconds.items()}
            same = sum(x == y for x, y in zip(answers["off"], answers["on"], strict=True))
            print(f"{threads:>7} {batch:>5} {rate['off']:>10.1f} {rate['on']:>9.1f} "
                  f"{rate['on'] / rate['off']:>6.2f}  {same}/{batch}")
            if a.score:
                scores, best = {}, {k: float("inf") for k in engines}
                for _ in range(a.rounds):
                    for name, engine in engines.items():
                        t0 = time.perf_counter()
                        scores[name] = engine.score(prompts[:batch], [r.output for r in records[:batch]])
                        best[name] = min(best[name], time.perf_counter() - t0)
                worst = max(abs(x - y) for x, y in zip(scores["off"], scores["on"], strict=True))
                print(f"{'':>13} scoring the {batch} reference answers: off {best['off']:.1f} s, on "
                      f"{best['on']:.1f} s ({best['off'] / best['on']:.2f}x), largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
