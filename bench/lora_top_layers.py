"""LoRA in every layer against the top layers only (`lora.top_layers`): DP step time and dev answer loss.

    python bench/lora_top_layers.py                                   # 128 records, 16 steps (~10 min here)
    python bench/lora_top_layers.py --top 10,6 --noise 0.7 --records 256

With adapters in the top N of SmolLM2-135M's 30 layers only, the backward pass stops below them: less compute
per step, fewer trained weights. Issue 18 asks to keep that only if the dev loss holds. Each arm trains a fresh
adapter on the same real medical train records, in the same order, with the same DP-SGD step the client runs
(`DPSGD.clipped_sum`: per-record clipping, then Gaussian noise of `--noise` x C; `--noise 0` = the non-private
fine-tune, where a capacity difference shows most), the answer loss only (as the server fine-tune) and AdamW.
It reports each arm's seconds of training and the mean answer NLL of `--dev` real dev records before and after.
The arms run one after the other in this process (the box's speed drifts: read the ratio, not the seconds).

Measured on a 2-core family-25 AMD EPYC (session 30), non-private, lr 1e-3, batch 8, answer NLL of real dev
records: 48 records, 8 dev: every layer 79.2 s, 4.2162 -> 3.6717; top 10 layers 48.2 s (1.64x), -> 4.1203
(+0.449). 128 records, 32 dev (the first arm shared the cores with a test run for ~80 s, so its time is
overstated): every layer -> 3.3617; top 10 -> 3.5791 (+0.217); top 6 -> 3.7014 (+0.340). The dev loss does not
hold, so no config turns it on.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical"


def dev_loss(model, batches) -> float:
    import torch

    from ksg_ray.common.lora import lm_loss

    model.eval()
    with torch.no_grad():
        losses = torch.cat([lm_loss(model, b) for b in batches])
    model.train()
    return float(losses.mean())


def run_arm(a, top: int | None, train, dev, pad_id: int) -> dict:
    import torch

    from ksg_ray.client.privacy.dp_sgd import DPSGD
    from ksg_ray.common.chat_format import collate
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import build_lora_lm, example_tokens, lm_loss
    from ksg_ray.common.sections import LoraSection

    model = build_lora_lm(torch.device("cpu"), model_path=resolve_model(a.model),
                          lora=LoraSection(top_layers=top), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    dev_batches = [collate(dev[i:i + 8], pad_id) for i in range(0, len(dev), 8)]
    before = dev_loss(model, dev_batches)
    dp = DPSGD(model, max_grad_norm=1.0, noise_multiplier=a.noise, expected_batch_size=a.batch, noise_seed=0)
    optimizer = torch.optim.AdamW(params, lr=a.lr)
    seconds = 0.0
    for step in range(0, len(train), a.batch):
        records = train[step:step + a.batch]
        chunks = [collate(records[i:i + a.physical_batch], pad_id) for i in range(0, len(records), a.physical_batch)]
        t0 = time.perf_counter()
        sums, _, _ = dp.clipped_sum(chunks, lm_loss)
        dp.all_reduce_grads(dp.noised_sum(sums))  # p.grad = noised sum / batch (one worker: no reduction)
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.perf_counter() - t0
    real = sum(example_tokens(e) for e in train)
    return {"top_layers": top, "trained_weights": sum(p.numel() for p in params), "train_s": seconds,
            "real_tokens_per_s": real / seconds, "dev_loss_before": before,
            "dev_loss_after": dev_loss(model, dev_batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--dev", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="records per step (a fixed batch, not Poisson)")
    ap.add_argument("--physical-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.0, help="σ: noise std / clip norm (0 = non-private)")
    ap.add_argument("--top", default="10", help="comma-separated top-layer counts, each against every layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from transformers import AutoTokenizer

    from ksg_ray.common.chat_format import tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(resolve_model(a.model))
    train, _ = tokenize_records(tok, load_records(DATA / "train.jsonl", limit=a.records), a.seq_len)
    dev, _ = tokenize_records(tok, load_records(DATA / "dev.jsonl", limit=a.dev), a.seq_len)
    arms = [None, *(int(t) for t in a.top.split(","))]
    results = []
    for top in arms:
        r = run_arm(a, top, train, dev, tok.pad_token_id)
        results.append(r)
        print(f"{'every layer' if top is None else f'top {top} layers':>14}: {r['trained_weights']:>7} weights, "
              f"{r['train_s']:6.1f} s ({r['real_tokens_per_s']:.0f} real tokens/s), dev answer loss "
              f"{r['dev_loss_before']:.4f} -> {r['dev_loss_after']:.4f}", flush=True)
    for r in results[1:]:
        print(f"top {r['top_layers']}: {results[0]['train_s'] / r['train_s']:.2f}x the speed, dev loss "
              f"{r['dev_loss_after'] - results[0]['dev_loss_after']:+.4f} against every layer")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "arms": results}, indent=2))


if __name__ == "__main__":
    main()
