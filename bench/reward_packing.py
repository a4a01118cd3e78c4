"""The DP reward step, one row per chat (the old path) against one packed row per record, side by side.

    python bench/reward_packing.py                    # the embedded default's 40 demo records and sizes (~3 min)
    python bench/reward_packing.py --data ../shared/data/medical/train.jsonl --records 24 --max-seq-len 384 \
        --answer-tokens 96                            # real medical questions (longer), the benchmark's sequence

A reward record is three judge chats (truth, DP generator, base) that share the judge prompt and the question.
The old path ran each chat as its own row and summed the rows' per-sample gradients into the record's before
clipping; `collate_reward` now packs a record into one row (prefix once, each answer seeing the prefix and
itself). Both arms run the same `DPSGD` clipping on the same SmolLM2 reward model and records, in physical
batches of `--batch` records sorted by length, alternately `--repeats` times; the bench prints each arm's
seconds and tokens per clipped sum, and how far the two clipped sums are apart (they must agree).

The truth is cut to `--answer-tokens` tokens and the other two "candidates" are the next records' answers cut
the same way (the embedded default asks the models for 16 new tokens and keeps each chat within 96 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings


def unpacked_batch(examples, pad_id: int) -> dict:
    """The old collate: every chat its own right-padded row, `row_to_record` mapping rows to records."""
    import torch

    rows = [r for ex in examples for r in ex.rows]
    row_to_record = [i for i, ex in enumerate(examples) for _ in ex.rows]
    chosen, rejected, pair_to_record, base = [], [], [], 0
    for i, ex in enumerate(examples):
        for c, r in ex.pairs:
            chosen.append(base + c)
            rejected.append(base + r)
            pair_to_record.append(i)
        base += len(ex.rows)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(width).expand_as(ids) * mask,
            "row_to_record": torch.tensor(row_to_record), "num_records": len(examples),
            "pair_chosen": torch.tensor(chosen), "pair_rejected": torch.tensor(rejected),
            "pair_to_record": torch.tensor(pair_to_record)}


def unpacked_clipped_sum(dp, batches) -> list:
    """The old `DPSGD.clipped_sum` for rows that are not records: per-row gradients summed per record, clipped."""
    import torch
    import torch.nn.functional as F

    sums = [torch.zeros_like(p, dtype=torch.float32) for p in dp.params]
    for b in batches:
        r = dp.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      position_ids=b["position_ids"]).logits.squeeze(-1).float()
        pair_loss = -F.logsigmoid(r[b["pair_chosen"]] - r[b["pair_rejected"]])
        n = b["num_records"]
        losses = torch.zeros(n).index_add(0, b["pair_to_record"], pair_loss) / torch.zeros(n).index_add(
            0, b["pair_to_record"], torch.ones_like(pair_loss))
        torch.autograd.grad(losses.sum(), dp.params)
        per_record = [torch.zeros((n, *p.shape)).index_add_(0, b["row_to_record"], p.grad_sample.float())
                      for p in dp.params]
        norms = torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in per_record], dim=1).norm(2, dim=1)
        factor = (dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for s, g in zip(sums, per_record, strict=True):
            s += torch.einsum("i,i...", factor, g)
        for p in dp.params:
            p.grad_sample = None
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="demo", help="records: demo, or a .jsonl of instruction/input/output")
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="records per forward pass (the configs' physical batch)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from ksg_ray.client.privacy.dp_sgd import DPSGD
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records
    from ksg_ray.common.reward_model import (
        bradley_terry_loss,
        build_lora_reward,
        collate_reward,
        reward_example_tokens,
        reward_pad_id,
        tokenize_reward_example,
    )
    from ksg_ray.common.sections import LoraSection

    warnings.filterwarnings("ignore")
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    records = load_records(a.data, limit=a.records + 2)

    def cut(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][: a.answer_tokens])

    examples = [tokenize_reward_example(tok, r.input, [cut(r.output), cut(records[i + 1].output),
                                                       cut(records[i + 2].output)], a.max_seq_len)
                for i, r in enumerate(records[: len(records) - 2])]
    pad = reward_pad_id(tok)
    order = sorted(range(len(examples)), key=lambda i: -reward_example_tokens(examples[i]))
    chunks = [[examples[i] for i in order[j:j + a.batch]] for j in range(0, len(order), a.batch)]
    arms = {"unpacked": [unpacked_batch(c, pad) for c in chunks], "packed": [collate_reward(c, pad) for c in chunks]}
    tokens = {name: sum(int(b["input_ids"].numel()) for b in batches) for name, batches in arms.items()}
    real = {"unpacked": sum(len(r) for ex in examples for r in ex.rows),
            "packed": sum(reward_example_tokens(ex) for ex in examples)}

    model = build_lora_reward(torch.device("cpu"), model_path=path, lora=LoraSection(r=8, alpha=16), seed=0)
    dp = DPSGD(model, max_grad_norm=a.clip, noise_multiplier=0.0, expected_batch_size=len(examples))
    dp.module.train()  # (clipped_sum does it for the packed arm)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    results = {}
    for _ in range(a.repeats):
        for name, batches in arms.items():
            start = time.perf_counter()
            if name == "packed":
                results[name], _, _ = dp.clipped_sum(batches, bradley_terry_loss)
            else:
                results[name] = unpacked_clipped_sum(dp, batches)
            seconds[name].append(time.perf_counter() - start)
    flat = {name: torch.cat([s.flatten() for s in sums]) for name, sums in results.items()}
    diff = float((flat["packed"] - flat["unpacked"]).norm() / flat["unpacked"].norm())
    best = {name: min(s) for name, s in seconds.items()}
    for name in arms:
        print(f"{name:9s} {best[name]:6.2f} s per clipped sum of {len(examples)} records (runs: "
              f"{', '.join(f'{s:.2f}' for s in seconds[name])}); {real[name]} real tokens, {tokens[name]} padded")
    print(f"speed-up {best['unpacked'] / best['packed']:.2f}x; clipped sums differ by {diff:.1e} (relative L2)")
    print(json.dumps({"records": len(examples), "max_seq_len": a.max_seq_len, "answer_tokens": a.answer_tokens,
                      "seconds": best, "real_tokens": real, "padded_tokens": tokens, "relative_difference": diff}))


if __name__ == "__main__":
    main()
