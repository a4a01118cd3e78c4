"""Greedy generation with the linear layers on MKL's packed GEMM vs plain sgemm, side by side in one process.

    python bench/packed_linear.py [--model smollm2-135m] [--tokens 64] [--batches 1,16,32] [--threads 1,2]

Two `TransformersEngine`s of the same model, one with `packed_linear=False`, generate greedy answers to the
same medical dev questions (`--batches` of them at once, the first whose prompt fits `--max-prompt-tokens`:
one 945-token question would pad a whole batch, and synthesis batches are of like lengths; `stop_at_eos=False`
so both generate the same token count), alternating so drift hits both alike. It prints tokens/s per engine,
the ratio, and whether the answers are identical. Run it with MKL's Intel path (`eval "$(python -m
ksg_ray.common.cpu_blas)"`), as `ksg` runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical" / "dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-prompt-tokens", type=int, default=192)
    a = ap.parse_args()

    import torch

    from ksg_ray.common.chat_format import build_messages
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records
    from ksg_ray.engines import SamplingParams, packed_linear, prompt_ids
    from ksg_ray.engines.transformers_engine import TransformersEngine

    packed_linear.PACK_ON_SEVERAL_THREADS = True  # the packed path at every thread count: what this bench measures
    batches = [int(b) for b in a.batches.split(",")]
    path = resolve_model(a.model)
    engines = {"plain": TransformersEngine(path, batch_size=max(batches), packed_linear=False),
               "packed": TransformersEngine(path, batch_size=max(batches))}
    prompts = [m for m in (build_messages(r)[:-1] for r in load_records(a.data))
               if len(prompt_ids(engines["plain"].tokenizer, m)) <= a.max_prompt_tokens][:max(batches)]
    params = SamplingParams(max_new_tokens=a.tokens, stop_at_eos=False)
    for engine in engines.values():
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    lengths = [len(prompt_ids(engines["plain"].tokenizer, m)) for m in prompts]
    print(f"{a.model}, fp32, greedy, {a.tokens} new tokens per answer, prompts of {min(lengths)}-{max(lengths)} "
          f"tokens, torch {torch.__version__}")
    print(f"{'threads':>7} {'batch':>5} {'plain tok/s':>12} {'packed tok/s':>13} {'ratio':>6}  same answers")
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
            print(f"{threads:>7} {batch:>5} {rate['plain']:>12.1f} {rate['packed']:>13.1f} "
                  f"{rate['packed'] / rate['plain']:>6.2f}  {answers['plain'] == answers['packed']}")


if __name__ == "__main__":
    main()
