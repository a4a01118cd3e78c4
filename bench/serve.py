"""Serving: throughput at 16 concurrent clients ÷ 1 client, and p50 latency over Serve minus direct `engine.generate`.

    python bench/serve.py [--model smollm2-135m] [--max-tokens 32] [--clients 16] [--seconds 20] [--rounds 16]

One run, side by side: the app (`ksg_ray.serve.app`, transformers engine, one model replica with one CPU
thread, `@serve.batch` up to `--clients`) on a local Ray, and the same model as a `TransformersEngine` in this
process with one torch thread. Every request is the same greedy chat request; Serve's answer is checked to
equal the direct one. Latency rounds alternate direct and Serve calls so drift hits both alike. The HTTP
clients run in this process and share the machine's cores with the replica: on a small machine that costs
Serve some of its throughput, so the ratios are conservative. It also times one batched call of `--clients`
prompts in process: how far batching can take this engine at all (the ceiling of the 16 / 1 ratio).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
import warnings

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each throughput window")
    parser.add_argument("--rounds", type=int, default=16, help="latency samples per side")
    parser.add_argument("--batch-wait-s", type=float, default=0.1, help="batching.batch_wait_timeout_s (the default)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    import openai
    import ray
    import torch
    from ray import serve

    from ksg_ray.common.hub import resolve_model
    from ksg_ray.engines import SamplingParams
    from ksg_ray.engines.transformers_engine import TransformersEngine
    from ksg_ray.serve.app import build_app

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({
        "models": {"m": path},
        "engine": {"kind": "transformers", "num_cpus": 1},
        "batching": {"max_batch_size": args.clients, "batch_wait_timeout_s": args.batch_wait_s},
        "ingress": {"model_max_ongoing_requests": max(32, 2 * args.clients)},
        "limits": {"max_tokens": args.max_tokens, "default_max_tokens": args.max_tokens},
    }), name="bench", route_prefix="/")
    engine = TransformersEngine(path)
    params = SamplingParams(max_new_tokens=args.max_tokens)
    request = dict(model="m", messages=PROMPT, max_tokens=args.max_tokens, temperature=0)

    def new_client() -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

    client = new_client()
    try:
        direct_answer = engine.generate([PROMPT], params)[0][0]
        served = client.chat.completions.create(**request)  # also loads the model in the replica
        assert served.choices[0].message.content == direct_answer.text, "Serve and the engine disagree"

        direct_s, serve_s = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            engine.generate([PROMPT], params)
            direct_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.chat.completions.create(**request)
            serve_s.append(time.perf_counter() - t0)

        def throughput(clients: int) -> tuple[float, float, int]:
            """(requests/s, completion tokens/s, errors) of `clients` closed-loop clients over one window."""
            stop_at = time.perf_counter() + args.seconds
            counts, lock = {"req": 0, "tok": 0, "err": 0}, threading.Lock()

            def loop() -> None:
                c = new_client()
                while time.perf_counter() < stop_at:
                    try:
                        tokens = c.chat.completions.create(**request).usage.completion_tokens
                        with lock:
                            counts["req"] += 1
                            counts["tok"] += tokens
                    except Exception:
                        with lock:
                            counts["err"] += 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=loop) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0  # includes the requests still in flight at the deadline
            return counts["req"] / elapsed, counts["tok"] / elapsed, counts["err"]

        one = throughput(1)
        many = throughput(args.clients)
        # the engine's own ceiling for that ratio: one batched call of `clients` prompts, in this process
        batched_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            engine.generate([PROMPT] * args.clients, params)
            batched_s.append(time.perf_counter() - t0)
    finally:
        serve.shutdown()
        ray.shutdown()

    p50_direct, p50_serve = statistics.median(direct_s), statistics.median(serve_s)
    print(f"model {args.model}, greedy, {direct_answer.num_tokens} new tokens per request, 1 CPU thread each side, "
          f"max_batch_size {args.clients}, batch_wait_timeout_s {args.batch_wait_s}")
    print(f"p50 latency: direct engine.generate {p50_direct * 1000:.0f} ms, over Serve {p50_serve * 1000:.0f} ms "
          f"-> Serve adds {(p50_serve - p50_direct) * 1000:+.0f} ms ({p50_serve / p50_direct:.2f}x)")
    print(f"throughput 1 client: {one[0]:.2f} req/s ({one[1]:.1f} tok/s); {args.clients} clients: {many[0]:.2f} req/s "
          f"({many[1]:.1f} tok/s); errors {one[2]} + {many[2]}")
    print(f"throughput {args.clients} clients / 1 client: {many[0] / one[0]:.2f}x")
    ceiling = args.clients / min(batched_s) * p50_direct
    print(f"the engine alone, one batch of {args.clients} in process: {args.clients / min(batched_s):.2f} req/s, "
          f"{ceiling:.2f}x its one-prompt rate: the ceiling of that ratio on this engine; Serve at "
          f"{args.clients} clients reaches {many[0] / (args.clients / min(batched_s)):.0%} of its batched rate")


if __name__ == "__main__":
    main()
