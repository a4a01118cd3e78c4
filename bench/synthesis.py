"""Generation throughput of the synthesis pipeline vs the bare engine, side by side in one run.

    python bench/synthesis.py [--engine transformers] [--prompts 192] [--tokens 48] [--batch 32]

Three ways to produce the same tokens with the same model (SmolLM2-135M) and batch size:
  pipeline  — the Ray Data generate stage (`GenerateUDF` on an actor pool), rows streamed back to the driver;
  engine    — the same engine called in-process on batches (no Ray);
  per-prompt loop — the engine called one prompt at a time (what a naive loop does).
Every answer is forced to `--tokens` new tokens (`stop_at_eos=False`), so tokens/s compare like for like.
The pipeline's time includes starting its actor and loading the model there; the line below it also shows
the rate with that start-up taken out. Goals (issue 4): pipeline ÷ engine ≥ 0.9, pipeline ÷ loop ≥ 5.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--loop-prompts", type=int, default=12, help="prompts for the (slow) per-prompt loop")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cpus", type=float, default=2, help="CPUs of the pipeline's actor (= torch threads)")
    args = parser.parse_args()

    import ray
    import torch

    from ksg_ray.common.hub import resolve_model
    from ksg_ray.engines import SamplingParams, build_engine
    from ksg_ray.engines.stage import generate_dataset

    model = resolve_model("smollm2-135m")
    prompts = [[{"role": "user", "content": f"Give me health tip number {i} in one sentence."}]
               for i in range(args.prompts)]
    params = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=args.tokens, stop_at_eos=False, seed=0)
    kw = {"batch_size": args.batch} if args.engine == "transformers" else {"enforce_eager": True}

    ray.init(num_cpus=max(2, int(args.cpus)), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    ds = generate_dataset(ray.data.from_items([{"messages": p} for p in prompts]), engine_kind=args.engine,
                          model_path=model, adapter_path=None, sampling=params, batch_size=args.batch,
                          num_cpus=args.cpus, engine_kwargs=kw)
    first = None
    rows = 0
    for _ in ds.iter_rows():
        first = first or time.perf_counter()
        rows += 1
    pipeline_s = time.perf_counter() - start
    ray.shutdown()
    assert rows == args.prompts

    torch.set_num_threads(max(1, int(args.cpus)))
    load = time.perf_counter()
    engine = build_engine(args.engine, model, **kw)
    load_s = time.perf_counter() - load
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    engine_s = time.perf_counter() - start
    tokens = sum(g.num_tokens for gens in out for g in gens)
    start = time.perf_counter()
    loop_tokens = sum(g.num_tokens for p in prompts[:args.loop_prompts] for g in engine.generate([p], params)[0])
    loop_s = time.perf_counter() - start

    pipe_tps, engine_tps, loop_tps = tokens / pipeline_s, tokens / engine_s, loop_tokens / loop_s
    warm_tps = tokens / max(pipeline_s - load_s, 1e-9)
    print(f"model SmolLM2-135M, engine {args.engine}, {args.prompts} prompts x {args.tokens} tokens, batch "
          f"{args.batch}, {args.cpus:g} CPUs")
    print(f"pipeline (Ray Data actor, incl. actor start + model load {load_s:.1f} s): {pipe_tps:8.1f} tokens/s "
          f"({pipeline_s:.1f} s)")
    print(f"pipeline without the model load:                        {warm_tps:8.1f} tokens/s")
    print(f"bare engine, batched:                                   {engine_tps:8.1f} tokens/s ({engine_s:.1f} s)")
    print(f"per-prompt loop ({args.loop_prompts} prompts):                           {loop_tps:8.1f} tokens/s")
    print(f"pipeline / engine: {pipe_tps / engine_tps:.3f} (without load: {warm_tps / engine_tps:.3f}; goal >= 0.9)")
    print(f"pipeline / per-prompt loop: {pipe_tps / loop_tps:.3f} (goal >= 5)")


if __name__ == "__main__":
    main()
