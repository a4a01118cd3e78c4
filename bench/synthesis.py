"""Synthesis speed vs its parts run bare, side by side in one run.

    python bench/synthesis.py [--engine transformers] [--prompts 192] [--tokens 48] [--batch 32]
    python bench/synthesis.py --answers-of RUN_DIR [--config configs/pipeline.yaml] [--worker-niceness 15,0]

Generation (the default). Three ways to produce the same tokens with the same model (SmolLM2-135M) and batch size:
  pipeline  — the Ray Data generate stage (`GenerateUDF` on an actor pool), rows streamed back to the driver;
  engine    — the same engine called in-process on batches (no Ray);
  per-prompt loop — the engine called one prompt at a time (what a naive loop does).
Every answer is forced to `--tokens` new tokens (`stop_at_eos=False`), so tokens/s compare like for like.
The pipeline's time includes starting its actor and loading the model there; the line below it also shows
the rate with that start-up taken out. Goals (issue 4): pipeline ÷ engine ≥ 0.9, pipeline ÷ loop ≥ 5.

The answers stage (`--answers-of RUN_DIR`, a finished pipeline run: its bundle and its sampled queries). The same
queries through the answers phase twice, with the pipeline config's synthesis settings:
  stage — `_run_answers` as the synthesis job runs it: Ray Data actor pools (judge, answer candidates, scoring)
          with their start-up and model loads, rows streamed to the driver's store;
  bare  — the same steps (`answer_steps`: the same classes and arguments) called in this process on the same
          batches, one after the other, model loads included.
Goal (issue 18): stage ≤ 1.25 × bare. `--worker-niceness 15,0` runs the stage once per niceness of Ray's workers
(15: Ray's default, below the driver and Ray's own processes), one after the other, then bare. Each side also
prints the machine's context switches per second (/proc/stat): on 2 cores, where the engine's 2 threads fill both,
every switch to one of Ray's own threads stalls the engine (its other thread waits at the next barrier).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--answers-of", type=Path, help="time the answers stage on this finished run's queries")
    parser.add_argument("--config", default="configs/pipeline.yaml", help="the pipeline config of that run")
    parser.add_argument("--worker-niceness", default="15", help="with --answers-of: the Ray workers' nice values "
                        "to time the stage at, comma-separated (Ray's default: 15)")
    args = parser.parse_args()
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # both sides on the BLAS path `ksg` runs on
    if args.answers_of:
        answers_vs_parts(args.answers_of, args.config, [int(n) for n in args.worker_niceness.split(",")])
        return

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


def answers_vs_parts(run_dir: Path, pipeline_config: str, niceness: list[int]) -> None:
    import json

    import ray
    import torch

    from ksg_ray.common.config import load_config
    from ksg_ray.pipeline.config import PipelineConfig
    from ksg_ray.server.synth import pipeline as synth
    from ksg_ray.server.synth.config import SynthConfig
    from ksg_ray.server.synth.store import JsonlStore

    stage = load_config(PipelineConfig, pipeline_config).synthesize
    raw = {r["prompt_id"]: r for r in map(json.loads, (run_dir / "synth" / "queries_raw.jsonl").open())}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(SynthConfig, stage.config, [*stage.overrides, f"bundle={run_dir / 'bundle'}",
                                                      f"run.output_dir={tmp}"])
        models = synth.SynthModels.from_config(cfg)
        queries, _ = synth._derive_queries(cfg, raw, [])
        stage_s, stage_cs = {}, {}
        for nice in niceness:
            os.environ["RAY_worker_niceness"] = str(nice)  # read by the raylet that this `ray.init` starts
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            out = Path(tmp) / f"nice{nice}"
            out.mkdir()
            start, switches = time.perf_counter(), context_switches()
            store = synth._run_answers(cfg, models, out, JsonlStore(out / "errors.jsonl", key="error_id"), queries)
            stage_s[nice] = time.perf_counter() - start
            stage_cs[nice] = (context_switches() - switches) / stage_s[nice]
            batches = list(ray.data.from_items(synth.answer_rows(cfg, queries)).iter_batches(
                batch_size=cfg.engine.batch_size, batch_format="numpy"))
            ray.shutdown()

    torch.set_num_threads(cfg.engine.threads or 2)
    start, switches = time.perf_counter(), context_switches()
    steps = [(s.fn(**s.kwargs) if s.actor else (lambda b, s=s: s.fn(b, **s.kwargs))) for s in
             synth.answer_steps(cfg, models)]
    load_s = time.perf_counter() - start
    rows = 0
    for batch in batches:
        for step in steps:
            batch = step(batch)
        rows += len(batch["id"])
    bare_s = time.perf_counter() - start
    bare_cs = (context_switches() - switches) / bare_s
    print(f"answers phase, {len(queries)} queries ({len(store)} written by the stage, {rows} by the bare steps), "
          f"engine {cfg.engine.kind}, batch {cfg.engine.batch_size}, {cfg.engine.threads} threads")
    print(f"bare steps in process (model loads {load_s:.1f} s included):     {bare_s:7.1f} s; "
          f"{bare_cs:.0f} context switches/s (machine)")
    for nice, seconds in stage_s.items():
        print(f"stage, Ray workers at nice {nice:2d} (actor pools, start-up and model loads included): {seconds:7.1f} s"
              f"; stage / bare: {seconds / bare_s:.2f} (goal <= 1.25), without the bare side's model loads: "
              f"{seconds / (bare_s - load_s):.2f}; {stage_cs[nice]:.0f} context switches/s (machine)")


def context_switches() -> int:
    """The machine's context switches since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        return next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("ctxt "))
    except (OSError, StopIteration):
        return 0


if __name__ == "__main__":
    main()
