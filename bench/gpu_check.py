"""The checks behind `bench/gpu_check.sh` (run it, not this file, on the GPU machine).

    python bench/gpu_check.py preflight [--dry-run]  # imports, exact configs, carried model and bundle; no CUDA
    python bench/gpu_check.py dp | synth | serve     # one check; writes WORK/<check>.json
    python bench/gpu_check.py summary                # PASS/FAIL per check -> RESULTS/gpu_check.json

dp:    `jobs/dp_finetune.py` (configs/dp_finetune_deepspeed_gpu.yaml) on Ray Train, DeepSpeed ZeRO-3 over NCCL,
       3 DP steps of tiny-random; ε recomputed with dp_accounting (PLD and RDP) from the run's σ, q and steps.
synth: `jobs/synthesize.py` on Ray Data, transformers engine forced onto CUDA (engine_kwargs.device=cuda, half
       a GPU per actor), from the carried bundle; every engine the workers logged must say "on cuda".
serve: `ksg serve tiny-random` on a GPU replica, asked through the official `openai` client.
WORK is $GPU_CHECK_WORK (/tmp/gpu-check); RESULTS is $OUT when set (the device tool brings it back), else WORK.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry" / "b"
BUNDLE = CARRY / "bundle"
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
RESULTS = Path(os.environ.get("OUT") or WORK)
CHECKS = ("dp", "synth", "serve")
DELTA = 1e-3
EPS_RTOL = 0.01  # PRV (the job) vs PLD (dp_accounting) differ by ~0.15% at these numbers; RDP vs RDP by ~0.02%

# the tests' tiny settings (tests/test_pipeline_job.py TINY_DP) on the GPU config
DP_ARGV = ["--config", "configs/dp_finetune_deepspeed_gpu.yaml", "model.name=tiny-random", "data.path=demo",
           "data.limit=20", "data.max_seq_len=96", "train.expected_batch_size=4", "train.physical_batch_size=4",
           "train.max_steps=3", "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.strategy=deepspeed",
           "scaling.zero_stage=3", f"privacy.delta={DELTA}", f"privacy.ledger_dir={WORK}/dp/ledger",
           f"run.output_dir={WORK}/dp/runs", f"run.bundle_dir={WORK}/dp/bundle"]
# tests/test_pipeline_job.py TINY["synthesize.overrides"], then the GPU placement
SYNTH_ARGV = ["--config", "configs/synthesize.yaml", f"bundle={BUNDLE}", f"run.output_dir={WORK}/synth", "min_rows=0",
              "professional.model=tiny-random", "queries.num_prompts=3", "queries.per_prompt=3",
              "queries.max_new_tokens=12", "queries.min_words=1", "queries.require_question=false",
              "queries.require_finished=false", "professional.filter=false", "answers.n=2",
              "answers.max_new_tokens=8", "answers.require_finished=false", "refine.n=2",
              "refine.critique_max_new_tokens=8", "refine.max_new_tokens=8", "engine.batch_size=4",
              "filters.language=false", "filters.degenerate=false", "filters.domain=false",
              "engine.num_gpus=0.5", "engine.engine_kwargs={device: cuda}"]
SERVE_ARGV = ["serve", "tiny-random", "--name", "tiny", "engine.num_gpus=0.5", "engine.engine_kwargs={device: cuda}"]
MODULES = ["torch", "transformers", "peft", "pydantic", "ray", "ray.train", "ray.train.torch", "ray.data", "ray.serve",
           "ray.serve._private.controller", "ray.serve._private.proxy", "ray.serve._private.replica", "deepspeed",
           "opacus", "dp_accounting.pld", "dp_accounting.rdp", "openai", "fastapi", "uvicorn",
           "ksg_ray.jobs.dp_finetune", "ksg_ray.jobs.synthesize", "ksg_ray.server.synth.pipeline",
           "ksg_ray.client.dp_trainer", "ksg_ray.engines.transformers_engine", "ksg_ray.serve.app",
           "ksg_ray.serve.launch", "ksg_ray.cli"]


def preflight(dry_run: bool) -> int:
    """Everything before the first CUDA call. Returns 0 (go on: CUDA is there), 3 (stopped: --dry-run) or 2
    (stopped: no CUDA); raises on a missing module, an invalid config, or no model or bundle."""
    import importlib

    for name in MODULES:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", "")
        print(f"  import {name:<38} {version:<12} {Path(mod.__file__).parent}")

    from ksg_ray.client.config import DPFinetuneConfig
    from ksg_ray.common.config import load_config
    from ksg_ray.common.hub import TINY_RANDOM_CACHE, cache_root
    from ksg_ray.serve.launch import app_config_from_args
    from ksg_ray.server.bundle_models import verify_bundle
    from ksg_ray.server.synth.config import SynthConfig

    dp = load_config(DPFinetuneConfig, DP_ARGV[1], DP_ARGV[2:])
    assert dp.scaling.strategy == "deepspeed" and dp.scaling.zero_stage == 3 and dp.scaling.use_gpu
    synth = load_config(SynthConfig, SYNTH_ARGV[1], SYNTH_ARGV[2:])
    assert synth.engine.kind == "transformers" and synth.engine.engine_kwargs == {"device": "cuda"}
    serve = app_config_from_args(_serve_parser().parse_intermixed_args(SERVE_ARGV[1:]))
    print(f"  configs: dp {DP_ARGV[1]} ({len(DP_ARGV) - 2} overrides), synth {SYNTH_ARGV[1]} "
          f"({len(SYNTH_ARGV) - 2} overrides), serve {serve.models} num_gpus={serve.engine.num_gpus}: valid")
    model = cache_root() / TINY_RANDOM_CACHE
    assert (model / "config.json").is_file(), f"no tiny-random in KSG_CACHE ({model}): run `gpu_check.sh prepare`"
    verify_bundle(BUNDLE)
    print(f"  tiny-random at {model}; bundle {BUNDLE} verified")

    import torch

    if dry_run or not torch.cuda.is_available():
        why = "--dry-run" if dry_run else "torch.cuda.is_available() is False"
        print(f"stopping before the first CUDA call ({why}): the next step is check 1, "
              f"`python jobs/dp_finetune.py {' '.join(DP_ARGV)}` on a Ray Train GPU worker (NCCL, DeepSpeed ZeRO-3)")
        return 3 if dry_run else 2
    print(f"  CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    return 0


def check_dp() -> dict:
    """DP fine-tuning on GPU with DeepSpeed ZeRO-3 over NCCL; its ε against dp_accounting's."""
    os.environ["NCCL_DEBUG"] = "INFO"  # the Ray Train worker inherits it: NCCL logs its communicator
    logs = _ray_logs_dir()
    from ksg_ray.jobs import dp_finetune

    s = dp_finetune.main(DP_ARGV)
    pld_eps, rdp_eps = dp_accounting_epsilons(s["noise_multiplier"], s["sample_rate"], s["steps"], DELTA)
    ckpt = Path(s["checkpoint"])
    nccl = _grep(logs, r"NCCL INFO (NCCL version \S+|.*Init COMPLETE.*)")  # printed once a communicator exists
    return {"sigma": s["noise_multiplier"], "q": s["sample_rate"], "steps": s["steps"], "delta": DELTA,
            "epsilon_job_prv": s["epsilon"], "epsilon_dp_accounting_pld": pld_eps,
            "epsilon_job_rdp": s["epsilon_rdp"], "epsilon_dp_accounting_rdp": rdp_eps, "final_loss": s["final_loss"],
            "nccl_log": nccl[:2],
            "asserts": {"ε PRV (job) = PLD (dp_accounting) within 1%": _close(s["epsilon"], pld_eps),
                        "ε RDP (job) = RDP (dp_accounting) within 1%": _close(s["epsilon_rdp"], rdp_eps),
                        "3 DP steps ran": s["steps"] == 3 and (ckpt / "progress.json").is_file(),
                        "ZeRO-3 checkpoint (partitioned weights)": any(ckpt.rglob("zero_pp_rank_0_*model_states.pt")),
                        "NCCL communicator made by the Ray Train worker": bool(nccl)}}


def dp_accounting_epsilons(sigma: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    """ε of `steps` Poisson-subsampled Gaussian steps by dp_accounting: (PLD, RDP at Opacus' orders)."""
    import logging

    from dp_accounting import dp_event, pld, rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # else a warning for each low RDP order it leaves out

    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    pld_acc = pld.PLDAccountant()
    pld_acc.compose(event)
    rdp_acc = rdp.RdpAccountant([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
    rdp_acc.compose(event)
    return float(pld_acc.get_epsilon(delta)), float(rdp_acc.get_epsilon(delta))


def check_synth() -> dict:
    """Synthesis on Ray Data with every engine on CUDA."""
    logs = _ray_logs_dir()
    from ksg_ray.jobs import synthesize

    s = synthesize.main(SYNTH_ARGV)
    engines = _grep(logs, r"transformers engine: \S+( \+ adapter \S+)? on \S+ \(\S+\)")
    rows = len(Path(s["output"]).read_text().splitlines())
    return {"engines": sorted(set(engines))[:6], "rows": rows, "funnel": s["funnel"], "seconds": s["seconds"],
            "asserts": {"synthesis finished": Path(s["output"]).is_file(),
                        "engines were built": bool(engines),
                        "every engine on cuda": bool(engines) and all(" on cuda" in e for e in engines)}}


def check_serve() -> dict:
    """`ksg serve` on a GPU replica, one chat completion through the official openai client."""
    import openai

    port, log = _free_port(), WORK / "serve" / "serve.log"
    log.parent.mkdir(parents=True)
    with open(log, "w") as out:  # not from the repo root: `-m` would put its ksg_ray, without ksg_ray.serve, first
        proc = subprocess.Popen([sys.executable, "-m", "ksg_ray.cli", *SERVE_ARGV, "--port", str(port)], cwd=WORK,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        deadline = time.monotonic() + 90  # gpu_check.sh gives the whole check 120 s
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ksg serve did not come up:\n{log.read_text()[-3000:]}") from None
                time.sleep(2)
        reply = client.chat.completions.create(model="tiny", max_tokens=8,
                                               messages=[{"role": "user", "content": "Is a mild fever dangerous?"}])
        gpu_apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    finally:
        proc.send_signal(2)  # Ctrl-C: ksg serve shuts Serve down
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    return {"models": models, "answer": reply.choices[0].message.content, "usage": reply.usage.model_dump(),
            "gpu_processes": gpu_apps,
            "asserts": {"model listed": models == ["tiny"],
                        "chat completion from the CUDA-pinned replica": reply.choices[0].finish_reason
                        in ("stop", "length") and reply.usage.completion_tokens >= 1}}


def summary() -> int:
    results = {}
    for name in CHECKS:
        path = WORK / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {
            "error": "no result (timed out or crashed: see its log)", "asserts": {}}
    for name, r in results.items():
        ok = bool(r["asserts"]) and all(r["asserts"].values()) and "error" not in r
        r["passed"] = ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<6}" + "; ".join(f"{k}: {v}" for k, v in r["asserts"].items())
              + (f"  [{r['error'][:300]}]" if "error" in r else ""))
    (RESULTS / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(r["passed"] for r in results.values()) else 1


def _ray_logs_dir() -> Path:
    """Start this check's own local Ray, its workers' root loggers at INFO (the engines log their device)."""
    import ray

    ctx = ray.init(logging_config=ray.LoggingConfig(log_level="INFO"))
    return Path(ctx.address_info["session_dir"]) / "logs"


def _grep(logs: Path, pattern: str) -> list[str]:
    found = []
    for f in sorted(logs.glob("worker-*")):
        found += [m.group(0).strip() for m in re.finditer(pattern, f.read_text(errors="ignore"))]
    return found


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= EPS_RTOL * abs(b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_parser():
    import argparse

    from ksg_ray.serve.launch import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser


def main(argv: list[str]) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if argv[0] == "preflight":
        return preflight("--dry-run" in argv)
    if argv[0] == "summary":
        return summary()
    name = argv[0]
    shutil.rmtree(WORK / name, ignore_errors=True)  # a fresh ledger and run dirs: ε is this run's alone
    (WORK / f"{name}.json").unlink(missing_ok=True)  # a check killed at its timeout leaves none: no stale PASS
    try:
        result = {"dp": check_dp, "synth": check_synth, "serve": check_serve}[name]()
    except Exception as e:  # the summary names the check that broke and how
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}", "asserts": {}}
    (WORK / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["asserts"] and all(result["asserts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
