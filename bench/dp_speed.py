"""DP training speed, old path vs new, side by side in one run: real tokens/s of one logical DP step.

    python bench/dp_speed.py --out runs/bench/dp_speed.json            # issue 18's settings (~15 min)
    python bench/dp_speed.py --records 64 --batch 16 --seq-len 128     # a smoke run

Settings (issue 18): SmolLM2-135M LoRA, 1,024 real medical train records, seq 384, the generator's labels
(question and answer), logical batch 256 (Poisson, q = 256/1,024), physical micro-batch 8, 2 torch threads.
Every path takes the same Poisson draw and runs `DPSGD.clipped_sum` (per-record clipping) on it:

  old          micro-batches in sampled order, logits at every position (the code before this change);
  grouped      micro-batches of similar length (`micro_batch_split`), logits at every position;
  new          grouped, and logits only where a label is (`lm_loss`): the code `dp_worker_loop` runs;
  new + MKL    new, with torch's MKL on its Intel code path (`ksg_ray.common.cpu_blas`), where it applies;
  new + bf16 autocast     new under bf16 autocast, where the CPU has native bf16 (AMX / avx512_bf16);
  new + bf16 frozen base  that, with the frozen linear weights stored in bf16 (`frozen_linears_to_bf16`): what
               `dp_worker_loop` runs when `bf16` is on.

A full logical step at these settings takes minutes per path, so each path times a systematic sample of its
micro-batches: ordered by padded size, every --stride-th is timed and stands for the --stride around it.
Tokens/s counts real (non-padding) tokens only, over the whole draw. The noise, the optimizer update and the
accounting are the same in every path and left out. Each path runs in its own subprocess (its own environment).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical" / "train.jsonl"
PATHS = ("old", "grouped", "new", "new + MKL Intel path", "new + bf16 autocast", "new + bf16 frozen base")


def worker(a) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ksg_ray.client.privacy.dp_sgd import DPSGD, poisson_sample
    from ksg_ray.common.chat_format import collate, tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import build_lora_lm, example_tokens, frozen_linears_to_bf16, lm_loss, per_sample_lm_loss
    from ksg_ray.common.ray_train import TrainTask, micro_batch_split
    from ksg_ray.common.records import load_records
    from ksg_ray.common.sections import LoraSection

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    examples, _ = tokenize_records(tok, load_records(a.train_data, limit=a.records), a.seq_len, question_loss=True)
    idx = poisson_sample(len(examples), min(1.0, a.batch / len(examples)), seed=0, step=0, rank=0, world_size=1)
    grouped = a.path != "old"
    task = TrainTask(build_model=None, examples=examples, collate=None, loss_fn=None, save=None, load=None,
                     length=example_tokens if grouped else None)
    chunks = micro_batch_split(idx, a.physical_batch, task)
    batches = [collate([examples[i] for i in c], tok.pad_token_id) for c in chunks]

    def full_logits_loss(module, b):  # the loss before this change: logits at every position
        out = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        return per_sample_lm_loss(out.logits, b["labels"])

    loss_fn = lm_loss if a.path.startswith("new") else full_logits_loss
    model = build_lora_lm(torch.device("cpu"), model_path=path, lora=LoraSection())
    if a.path.endswith("frozen base"):
        frozen_linears_to_bf16(model)
    dp = DPSGD(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=a.batch, noise_seed=0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in a.path)
    by_size = sorted(range(len(batches)), key=lambda j: batches[j]["input_ids"].numel())
    strata = [by_size[s:s + a.stride] for s in range(0, len(by_size), a.stride)]
    with autocast:
        dp.clipped_sum([batches[by_size[0]]], loss_fn)  # warm-up
    estimate, timed = 0.0, []
    for stratum in strata:
        j = stratum[len(stratum) // 2]
        t0 = time.perf_counter()
        with autocast:
            dp.clipped_sum([batches[j]], loss_fn)
        seconds = time.perf_counter() - t0
        estimate += seconds * len(stratum)
        timed.append({"records": len(chunks[j]), "padded": batches[j]["input_ids"].numel(),
                      "real": int(batches[j]["attention_mask"].sum()), "seconds": seconds})
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return {"records": len(idx), "micro_batches": len(batches), "real_tokens": real, "padded_tokens": padded,
            "labelled_tokens": labelled, "step_s": estimate, "tokens_per_s": real / estimate, "timed": timed}


def spawn(a, path: str, env: dict) -> dict:
    args = [sys.executable, __file__, "--worker", path] + [
        x for k in ("records", "seq_len", "batch", "physical_batch", "stride", "threads", "model", "train_data")
        for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
    env = os.environ | {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)} | env
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"path {path!r} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--physical-batch", type=int, default=8)
    ap.add_argument("--stride", type=int, default=4, help="time every stride-th micro-batch (by padded size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-data", default=str(DATA))
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of: " + ", ".join(PATHS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.path = a.worker
        print(json.dumps(worker(a)), flush=True)
        return

    from ksg_ray.common import cpu_blas
    from ksg_ray.common.hardware import bf16_available

    results = {}
    default = ":".join(p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and cpu_blas.LIBRARY not in p)
    for path in a.paths.split(","):
        env = {"LD_PRELOAD": default}
        if path.endswith("MKL Intel path"):
            env = cpu_blas.preload_env()
            if env is None:
                print(f"{path}: skipped ({cpu_blas.why_not()})")
                continue
        if "bf16" in path and not bf16_available("cpu"):
            print(f"{path}: skipped (this CPU has no native bf16: AMX or avx512_bf16)")
            continue
        results[path] = spawn(a, path, env)
        r = results[path]
        print(f"{path:<24} {r['tokens_per_s']:7.1f} real tokens/s  step {r['step_s']:6.0f} s  "
              f"({r['records']} records, {r['micro_batches']} micro-batches, {r['real_tokens']} real of "
              f"{r['padded_tokens']} padded tokens, {r['labelled_tokens']} labelled)", flush=True)
    if "old" in results:
        for path, r in results.items():
            print(f"{path:<24} × {r['tokens_per_s'] / results['old']['tokens_per_s']:.2f} of old")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k not in ("out", "worker")},
                                     "load_avg_1m_at_end": os.getloadavg()[0], "paths": results}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
