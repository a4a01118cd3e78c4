"""Serving: throughput at 16 concurrent clients ÷ 1 client, and p50 latency over Serve minus direct `engine.generate`.

    python bench/serve.py [--model smollm2-135m] [--max-tokens 32] [--clients 16] [--seconds 20] [--rounds 16]

One run, side by side: the app (`ksg_ray.serve.app`, transformers engine, one model replica with one CPU
thread, `@serve.batch` up to `--clients`) on a local Ray, and the same model as a `TransformersEngine` in this
process with one torch thread. Every request is the same greedy chat request; Serve's answer is checked to
equal the direct one. Latency rounds alternate direct and Serve calls so drift hits both alike; the median of
each round's own difference is printed too, the steadier figure where the machine's speed drifts, and Serve's own
share: each call less the engine time the replica reports for it (`Server-Timing`), free of the few percent by
which the same engine's speed differs between two processes, with the `openai` client and with a plain HTTP
client (the client library's own parsing is not Serve's). Throughput is
printed two ways: over the whole window from the clients' start (their ramp-up included), and in steady state
(each closed-loop client's rate from its first answer to its last, summed). The HTTP
clients run in this process and share the machine's cores with the replica: on a small machine that costs
Serve some of its throughput, so the ratios are conservative. It also times one batched call of `--clients`
prompts in process: how far batching can take this engine at all (the ceiling of the 16 / 1 ratio).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import threading
import time
import warnings
from typing import Any

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
    from ksg_ray.serve.launch import start_serve

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    start_serve("127.0.0.1", port)
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

        def engine_s(headers: Any) -> float:
            return float(headers.get("Server-Timing").removeprefix("engine;dur=")) / 1000

        plain = http.client.HTTPConnection("127.0.0.1", port)  # no client library: Serve's share alone
        body, headers = json.dumps(request), {"Content-Type": "application/json"}
        direct_s, serve_s, own_s, plain_own_s = [], [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            engine.generate([PROMPT], params)
            direct_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(**request)
            serve_s.append(time.perf_counter() - t0)
            own_s.append(serve_s[-1] - engine_s(raw.headers))
            t0 = time.perf_counter()
            plain.request("POST", "/v1/chat/completions", body, headers)
            resp = plain.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"][0]["message"]["content"] == \
                direct_answer.text
            plain_own_s.append(time.perf_counter() - t0 - engine_s(resp.headers))

        def throughput(clients: int) -> dict[str, float]:
            """`clients` closed-loop clients over one window, two ways (requests/s, completion tokens/s):

            - "window": every completion from the start of the clients to the last one (the window's requests
              still in flight at its end are waited for and counted). It includes the ramp-up: the clients being
              created one after another, and a first batch that forms while they arrive;
            - "steady": each client's own rate from its first completion to its last, summed over the clients
              (a closed-loop client's rate is one request per round trip, so this is the served rate once every
              client is sending, without the ramp-up; per client, so batched completions are not cut by the
              window's edges).
            """
            stop_at = time.perf_counter() + args.seconds
            done: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
            errors = [0] * clients

            def loop(i: int) -> None:
                c = new_client()
                while time.perf_counter() < stop_at:
                    try:
                        tokens = c.chat.completions.create(**request).usage.completion_tokens
                        done[i].append((time.perf_counter(), tokens))
                    except Exception:
                        errors[i] += 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0  # includes the requests still in flight at the deadline
            steady_req = sum((len(d) - 1) / (d[-1][0] - d[0][0]) for d in done if len(d) > 1)
            steady_tok = sum(sum(n for _, n in d[1:]) / (d[-1][0] - d[0][0]) for d in done if len(d) > 1)
            return {"req": sum(map(len, done)) / elapsed, "tok": sum(n for d in done for _, n in d) / elapsed,
                    "steady_req": steady_req, "steady_tok": steady_tok, "errors": sum(errors)}

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
    paired = statistics.median(s - d for s, d in zip(serve_s, direct_s, strict=True))
    print(f"p50 latency: direct engine.generate {p50_direct * 1000:.0f} ms, over Serve {p50_serve * 1000:.0f} ms "
          f"-> Serve adds {(p50_serve - p50_direct) * 1000:+.0f} ms ({p50_serve / p50_direct:.2f}x); the median of "
          f"the {len(serve_s)} rounds' own differences (each Serve call less the direct call just before it, so "
          f"drift between rounds cancels): {paired * 1000:+.0f} ms")
    print(f"Serve's own share: each call less its engine time in the replica (`Server-Timing`, the same request "
          f"and process; the same engine's speed differs a few percent from one process to another on a small "
          f"machine), median {statistics.median(own_s) * 1000:+.1f} ms with the openai client, "
          f"{statistics.median(plain_own_s) * 1000:+.1f} ms with a plain HTTP client (http.client, one connection)")
    for way, label in (("", "whole window, ramp-up included"), ("steady_", "steady state, each client first to last")):
        print(f"throughput ({label}): 1 client {one[way + 'req']:.2f} req/s ({one[way + 'tok']:.1f} tok/s); "
              f"{args.clients} clients {many[way + 'req']:.2f} req/s ({many[way + 'tok']:.1f} tok/s); "
              f"{args.clients} / 1: {many[way + 'req'] / one[way + 'req']:.2f}x")
    print(f"errors: {one['errors']} + {many['errors']}")
    batched_rate = args.clients / min(batched_s)
    print(f"the engine alone, one batch of {args.clients} in process: {batched_rate:.2f} req/s, "
          f"{batched_rate * p50_direct:.2f}x its one-prompt rate: the ceiling of that ratio on this engine; Serve at "
          f"{args.clients} clients reaches {many['steady_req'] / batched_rate:.0%} of its batched rate (steady state)")


if __name__ == "__main__":
    main()
