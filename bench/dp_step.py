"""DP step vs non-DP step: time and peak memory, same model, same batch, measured side by side in one run.

    python bench/dp_step.py [--model smollm2-135m] [--batch 8] [--seq 128] [--steps 5]

Each mode runs in its own subprocess so its peak memory (RSS on CPU, `max_memory_allocated` on CUDA) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings


def run_mode(mode: str, model_name: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    from ksg_ray.client.privacy.dp_sgd import DPSGD
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import build_lora_lm, lm_loss
    from ksg_ray.common.sections import LoraSection

    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_lora_lm(device, model_path=resolve_model(model_name), lora=LoraSection(r=8, alpha=16))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10000, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
         "position_ids": torch.arange(seq).expand(batch, seq).clone()}
    b = {k: v.to(device) for k, v in b.items()}
    if mode == "dp":
        dp = DPSGD(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=batch)
        opt = torch.optim.AdamW(dp.params, lr=1e-4)

        def step():
            sums, _, _ = dp.clipped_sum([b], lm_loss)
            dp.all_reduce_grads(dp.noised_sum(sums))
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            lm_loss(model, b).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "step_s": seconds, "peak_bytes": peak, "device": device.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mode", choices=["dp", "plain"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.model, a.batch, a.seq, a.steps)))
        return
    res = {}
    for mode in ("plain", "dp"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", a.model, "--batch", str(a.batch),
                              "--seq", str(a.seq), "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    p, d = res["plain"], res["dp"]
    print(f"model={a.model} batch={a.batch} seq={a.seq} device={d['device']} steps={a.steps}")
    print(f"non-DP step {p['step_s']:.3f} s, peak {p['peak_bytes'] / 2**20:.0f} MiB")
    print(f"DP step     {d['step_s']:.3f} s, peak {d['peak_bytes'] / 2**20:.0f} MiB")
    print(f"DP/non-DP time ratio {d['step_s'] / p['step_s']:.2f}x, peak-memory ratio "
          f"{d['peak_bytes'] / p['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
