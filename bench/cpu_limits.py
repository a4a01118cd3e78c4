"""Know the limit: this CPU's fp32 matmul peak, the compute limit it sets for SmolLM2-135M LoRA training and greedy
generation (tokens/s), and today's DP step and batched generation as a share of that limit.

    python bench/cpu_limits.py --out runs/bench/cpu_limits.json     # full settings, on a quiet machine (~20 min)
    python bench/cpu_limits.py --quick --out /tmp/cpu_limits.json    # smallest settings: a smoke run, noisy figures

Full settings (issue 18): 1,024 real medical train records, seq 384, logical batch 256 (Poisson, q = 256/1,024),
physical micro-batch 8 as `dp_trainer` forms it (the first is a warm-up, the next --micro-batches are timed and
the logical step is extrapolated by micro-batch count); generation: 64 medical dev questions, batch 32, greedy,
128 new tokens. Tokens/s counts real tokens only (attention_mask; `Generation.num_tokens`): padding is waste, so
removing it shows up as a lower cost, not as a higher rate.

FLOPs come from the model config. A forward over T positions costs T * linear + attn * T(T+1)/2 (causal), with
linear = 2 * (the layers' weight matrices + the tied lm head) and attn = 4 * layers * heads * head_dim per attended
position (QK^T and PV). A LoRA step on a frozen base is that forward plus the backward through activations:
2 * linear + 3 * attention + 3 * LoRA (adapter forward, input grad, per-sample weight grad) per token; clipping and
noise are left out (small). g tokens generated after a p-token prompt run p + g - 1 positions, prefill included.
Limit = peak FLOP/s * real tokens / their FLOPs, so a ratio is the achieved FLOP rate over the matmul peak.

The peak is an n x n fp32 matmul timed on every path torch can take here, each in its own subprocess (own env and
threads): MKL sgemm (torch's fp32 path; MKL_ENABLE_INSTRUCTIONS and MKL_DEBUG_CPU_TYPE tried), MKL forced onto its
Intel code path (an LD_PRELOAD shim answering MKL's vendor check `mkl_serv_intel_cpu_true` with 1; needs `cc`),
oneDNN fp32 (mkldnn_linear) and, for reference, bf16. "today" = torch's default fp32 path; "best" = the fastest fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical"
SETTINGS = {"records": 1024, "seq_len": 384, "batch": 256, "physical_batch": 8, "micro_batches": 3,
            "gen_prompts": 64, "gen_tokens": 128, "gen_batch": 32, "matmul_n": 2048}
QUICK = {"records": 16, "seq_len": 64, "batch": 16, "micro_batches": 1, "gen_prompts": 4, "gen_tokens": 8,
         "gen_batch": 4, "matmul_n": 512}


def flop_model(cfg: dict, lora_r: int = 8, targets=("q_proj", "v_proj")) -> dict:
    """FLOPs per token of a Llama-style config (see the module docstring)."""
    h, layers, inter, nq = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg[
        "num_attention_heads"]
    nkv, hd = cfg.get("num_key_value_heads") or nq, cfg.get("head_dim") or h // nq
    dims = {"q_proj": (h, nq * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nq * hd, h)}
    linear = 2 * (layers * (2 * h * nq * hd + 2 * h * nkv * hd + 3 * h * inter) + h * cfg["vocab_size"])
    return {"linear": linear, "attn_per_position": 4 * layers * nq * hd,
            "lora": 2 * layers * lora_r * sum(sum(dims[t]) for t in targets)}


def _model_flops(path: str) -> dict:
    return flop_model(json.loads(Path(path, "config.json").read_text()))


def _fwd(m: dict, t: int) -> float:
    return t * m["linear"] + m["attn_per_position"] * t * (t + 1) / 2


def worker_peak(a) -> dict:
    import torch

    n, out = a.matmul_n, {}
    x, y = torch.randn(n, n), torch.randn(n, n)

    def gflops(f, reps=5):
        f()
        return 2 * n**3 / min(_timed(f) for _ in range(reps)) / 1e9

    out["mkl_fp32"] = gflops(lambda: x @ y)
    ref = x.double() @ y.double()
    out["mkl_fp32_rel_err"] = float(((x @ y).double() - ref).abs().max() / ref.abs().max())
    if not a.mkl_only:
        xm, ym, xb, yb = x.to_mkldnn(), y.to_mkldnn(), x.bfloat16(), y.bfloat16()
        out["onednn_fp32"] = gflops(lambda: torch._C._nn.mkldnn_linear(xm, ym))
        out["bf16"] = gflops(lambda: xb @ yb)
    return out


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def worker_train(a) -> dict:
    """The project's DP step (`DPSGD` as `dp_worker_loop` runs it) on this rank's Poisson share, no Ray Train."""
    import torch
    from transformers import AutoTokenizer

    from ksg_ray.client.privacy.dp_sgd import DPSGD, poisson_sample
    from ksg_ray.common.chat_format import collate, tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import build_lora_lm, lm_loss
    from ksg_ray.common.records import load_records
    from ksg_ray.common.sections import LoraSection

    warnings.filterwarnings("ignore")
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    examples, _ = tokenize_records(tok, load_records(a.train_data, limit=a.records), a.seq_len, question_loss=True)
    model = build_lora_lm(torch.device("cpu"), model_path=path, lora=LoraSection())
    n, q = len(examples), min(1.0, a.batch / len(examples))
    dp = DPSGD(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=q * n, noise_seed=0)
    opt = torch.optim.AdamW(dp.params, lr=1e-4)
    idx = poisson_sample(n, q, seed=0, step=0, rank=a.rank, world_size=a.world)
    chunks = [collate([examples[i] for i in idx[j:j + a.physical_batch]], tok.pad_token_id)
              for j in range(0, len(idx), a.physical_batch)]
    dp.clipped_sum(chunks[:1], lm_loss)  # warm-up
    timed = chunks[1:1 + a.micro_batches] or chunks[:1]
    if a.barrier:  # concurrent workers start their timed work together
        Path(a.barrier, f"ready{a.rank}").touch()
        while len(list(Path(a.barrier).glob("ready*"))) < a.world:
            time.sleep(0.05)
    t0 = time.perf_counter()
    sums, _, _ = dp.clipped_sum(timed, lm_loss)
    t1 = time.perf_counter()
    dp.all_reduce_grads(dp.noised_sum(sums))
    opt.step()
    t2 = time.perf_counter()
    lengths = [int(v) for c in timed for v in c["attention_mask"].sum(1)]
    m = _model_flops(path)
    return {"seconds": t1 - t0, "update_s": t2 - t1, "tokens": sum(lengths), "micro_batches": len(timed),
            "flops": sum(k * (2 * m["linear"] + 3 * m["lora"]) + 3 * m["attn_per_position"] * k * (k + 1) / 2
                         for k in lengths), "padded_tokens": sum(c["input_ids"].numel() for c in timed),
            "records_in_batch": len(idx), "chunks_in_batch": len(chunks),
            "step_s_extrapolated": (t1 - t0) / len(timed) * len(chunks) + (t2 - t1)}


def worker_gen(a) -> dict:
    from ksg_ray.common.chat_format import build_messages
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records
    from ksg_ray.engines import SamplingParams, build_engine, prompt_ids

    path = resolve_model(a.model)
    engine = build_engine("transformers", path, batch_size=a.gen_batch, dtype="float32", device="cpu")
    prompts = [build_messages(r)[:-1] for r in load_records(a.dev_data, limit=a.gen_prompts)]
    engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=a.gen_tokens))
    seconds = time.perf_counter() - t0
    pairs = [(len(prompt_ids(engine.tokenizer, p)), g[0].num_tokens) for p, g in zip(prompts, out, strict=True)]
    m = _model_flops(path)
    return {"seconds": seconds, "tokens": sum(g for _, g in pairs), "prompt_tokens": sum(p for p, _ in pairs),
            "flops": sum(_fwd(m, p + g - 1) for p, g in pairs), "prefill_flops": sum(_fwd(m, p) for p, _ in pairs)}


def spawn(a, kind: str, threads: int, env: dict | None = None, extra=(), wait=True):
    args = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--model", a.model,
            "--train-data", a.train_data, "--dev-data", a.dev_data, *extra]
    args += [x for k in SETTINGS for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} | (env or {})
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return collect(p) if wait else p


def collect(p) -> dict:
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{' '.join(p.args[2:6])} failed:\n{err[-3000:]}")
    lines = out.splitlines()
    res = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    verbose = [ln.split(",") for ln in lines if ln.startswith("onednn_verbose")]
    isa = [f[-1].removeprefix("isa:") for f in verbose if f[-1].startswith("isa:")]
    return res | ({"onednn_isa": isa[0], "onednn_impls": sorted({":".join(f[5:7]) for f in verbose if f[3] == "exec"})}
                  if isa else {})


def build_shim() -> str | None:
    d = Path(tempfile.mkdtemp(prefix="ksg-mkl-shim-"))
    (d / "shim.c").write_text("int mkl_serv_intel_cpu_true(void) { return 1; }\n")
    cmd = ["cc", "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c")]
    return str(d / "shim.so") if subprocess.run(cmd, capture_output=True).returncode == 0 else None


def system_info() -> dict:
    import torch

    show, cpu = torch.__config__.show(), Path("/proc/cpuinfo").read_text()
    field = lambda k: (re.search(rf"^{k}\s*:\s*(.*)$", cpu, re.M) or [None, "?"])[1]  # noqa: E731
    grep = lambda pat: (re.search(pat, show) or [None, "?"])[1]  # noqa: E731
    return {"cpu": f"{field('model name')} (family {field('cpu family')}, model {field('model')})",
            "isa_flags": sorted(f for f in field("flags").split() if re.match(r"avx|amx", f)),
            "torch": torch.__version__,
            "blas_info": grep(r"BLAS_INFO=(\w+)"), "mkl": grep(r"Math Kernel Library Version (\S+)"),
            "onednn": grep(r"MKL-DNN (v[\d.]+)"), "cpu_capability": grep(r"CPU capability usage: (\w+)"),
            "mkldnn_available": torch.backends.mkldnn.is_available(), "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS")},
            "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in SETTINGS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-data", default=str(DATA / "train.jsonl"))
    ap.add_argument("--dev-data", default=str(DATA / "dev.jsonl"))
    ap.add_argument("--quick", action="store_true", help=f"smallest settings: {QUICK}")
    ap.add_argument("--out", type=Path, help="write every figure to this JSON file")
    for k, v in (("worker", None), ("barrier", None), ("threads", 1), ("rank", 0), ("world", 1), ("mkl-only", 0)):
        ap.add_argument(f"--{k}", default=v, type=type(v) if v is not None else str, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps({"peak": worker_peak, "train": worker_train, "gen": worker_gen}[a.worker](a)), flush=True)
        return
    if a.quick:
        vars(a).update(QUICK)
    info, shim = system_info(), build_shim()
    peaks = {"default": {t: spawn(a, "peak", t, {"ONEDNN_VERBOSE": "1"} if t == 1 else None) for t in (1, 2)}}
    for k, v in (("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX512"),
                 ("MKL_DEBUG_CPU_TYPE", "5")):
        peaks[f"{k}={v}"] = {1: spawn(a, "peak", 1, {k: v}, ["--mkl-only", "1"])}
    if shim:
        peaks["MKL Intel path"] = {t: spawn(a, "peak", t, {"LD_PRELOAD": shim}, ["--mkl-only", "1"]) for t in (1, 2)}
    today = {t: peaks["default"][t]["mkl_fp32"] for t in (1, 2)}
    best = {t: max(p[t][k] for p in peaks.values() if t in p for k in ("mkl_fp32", "onednn_fp32") if k in p[t])
            for t in (1, 2)}

    intel = {"LD_PRELOAD": shim} if shim else None
    with tempfile.TemporaryDirectory() as bar:
        pair = [spawn(a, "train", 1, None, ["--barrier", bar, "--rank", str(r), "--world", "2"], False) for r in (0, 1)]
        pair = [collect(p) for p in pair]
    runs = {"train 1 worker x 1 thread": ([spawn(a, "train", 1)], 1),
            "train 1 worker x 2 threads": ([spawn(a, "train", 2)], 2),
            "train 2 workers x 1 thread, concurrent": (pair, 1)}
    runs |= {"train 1 worker x 2 threads, MKL Intel path": ([spawn(a, "train", 2, intel)], 2)} if shim else {}
    runs |= {f"gen batch {a.gen_batch}, {t} thread(s)": ([spawn(a, "gen", t)], t) for t in (1, 2)}
    runs |= {f"gen batch {a.gen_batch}, 2 threads, MKL Intel path": ([spawn(a, "gen", 2, intel)], 2)} if shim else {}

    table = {}
    for name, (parts, t) in runs.items():
        tokens, flops = sum(p["tokens"] for p in parts), sum(p["flops"] for p in parts)
        rate = sum(p["tokens"] / p["seconds"] for p in parts)  # concurrent workers: the sum of their rates
        row = {"tokens_per_s": rate, "flops_per_token": flops / tokens, "workers": parts}
        for key, peak in (("today", today[t]), ("best", best[t])):
            row[f"limit_{key}"] = len(parts) * peak * 1e9 * tokens / flops
            row[f"ratio_{key}"] = rate / row[f"limit_{key}"]
        table[name] = row

    print(f"CPU: {info['cpu']}; {' '.join(info['isa_flags'])}\ntorch {info['torch']}: BLAS_INFO={info['blas_info']}, "
          f"MKL {info['mkl']}, oneDNN {info['onednn']} (available: {info['mkldnn_available']}; "
          f"{peaks['default'][1].get('onednn_isa')}; {peaks['default'][1].get('onednn_impls')}), ATen CPU "
          f"capability {info['cpu_capability']}, {info['torch_threads']} torch threads, env {info['env']}")
    if info["load_avg_1m"] > 0.5:
        print(f"WARNING: load average {info['load_avg_1m']:.1f} at start: the machine is busy, figures are low")
    print(f"\n{f'{a.matmul_n}^2 matmul, GFLOP/s':<50}{'1 thread':>10}{'2 threads':>10}   max rel. err vs fp64")
    for name, p in peaks.items():
        for k in [k for k in ("mkl_fp32", "onednn_fp32", "bf16") if k in p[1]]:
            cells = "".join(f"{p[t][k]:>10.1f}" if t in p else " " * 10 for t in (1, 2))
            print(f"  {name + ' ' + k:<48}{cells}" + (f"   {p[1]['mkl_fp32_rel_err']:.1e}" if k == "mkl_fp32" else ""))
    from ksg_ray.common.hub import resolve_model

    m = _model_flops(resolve_model(a.model))
    print(f"\nFLOPs: linear {m['linear'] / 1e6:.1f} M/token, attention {m['attn_per_position'] / 1e3:.1f} K per "
          f"attended position, LoRA {m['lora'] / 1e6:.2f} M; gen FLOP/token includes the prompts' prefill")
    print(f"{'run (real tokens/s; limits at today`s / best fp32 peak)':<52}{'tok/s':>7}{'FLOP/tok':>10}{'today':>7}"
          f"{'ratio':>7}{'best':>7}{'ratio':>7}")
    for name, r in table.items():
        print(f"{name:<52}{r['tokens_per_s']:>7.1f}{r['flops_per_token'] / 1e6:>9.0f}M{r['limit_today']:>7.0f}"
              f"{r['ratio_today']:>7.2f}{r['limit_best']:>7.0f}{r['ratio_best']:>7.2f}")
    w = table["train 1 worker x 2 threads"]["workers"][0]
    print(f"\nlogical step ({a.batch} expected records; this draw {w['records_in_batch']} in {w['chunks_in_batch']} "
          f"micro-batches of {a.physical_batch}), extrapolated from {w['micro_batches']} timed: " + "; ".join(
              f"{k.removeprefix('train ')} {step:.0f} s ({step / 60:.1f} min)" for k, r in table.items()
              if k.startswith("train") and (step := max(p["step_s_extrapolated"] for p in r["workers"]))))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"settings": {k: getattr(a, k) for k in ("model", *SETTINGS)}, "system": info,
                                     "matmul_gflops": peaks, "peak_today": today, "peak_best": best, "flops": m,
                                     "runs": table}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
