"""SERVER SIDE — fine-tune the target model on the synthetic data (KnowledgeSG step 6, RewardDS step 7) on Ray Train.

    ksg finetune configs/finetune.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune.yaml

Reads the synthetic data set (`data.path`, written by `ksg synthesize`), a public dev set and, with
`init.from=bundle:DIR`, the bundle's DP generator adapter: never a private record, so no DP is applied. Loss on
answer tokens only; after each epoch the dev set is answered greedily and the epoch with the best ROUGE-L is
exported to `<run.output_dir>/<run.name>/model/` (layout: `ksg_ray.server.finetune.export`), with
`finetune_summary.json` beside it and inside it.

RewardDS rounds: `run.name=round0 data.max_round=0 train.epochs=8`, then for r = 1, 2:
`run.name=round<r> data.max_round=<r> init.from=runs/finetune/round<r-1>/model train.epochs=3`.
A rerun with the same `run.output_dir`/`run.name` resumes where it died (and refuses changed settings).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

from ksg_ray.common.config import job_config
from ksg_ray.server.finetune.config import FinetuneConfig
from ksg_ray.server.finetune.export import format_summary

logger = logging.getLogger("ksg.finetune")
CONFIG = FinetuneConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])
    start = time.time()

    from transformers import AutoTokenizer

    from ksg_ray.common.chat_format import build_messages, collate, tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import example_tokens, lm_loss, load_adapter, save_adapter
    from ksg_ray.server.finetune import trainer as ft
    from ksg_ray.server.finetune.data import load_finetune_data
    from ksg_ray.server.finetune.export import SUMMARY_FILE, export_model_dir, resolve_init

    run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    init = resolve_init(cfg.init.from_, cfg.model.name, mode=cfg.mode, export=cfg.export)
    if init.path and Path(init.path).resolve().is_relative_to(run_dir):
        raise ValueError(f"init.from={init.source} lies inside this run ({run_dir}), whose export replaces it: "
                         "give each round its own run.name")
    data = load_finetune_data(cfg.data.path, max_round=cfg.data.max_round, dev_path=cfg.dev.path,
                              dev_limit=cfg.dev.limit, holdout_fraction=cfg.dev.holdout_fraction,
                              limit=cfg.data.limit, seed=cfg.train.seed)
    model_path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, truncated = tokenize_records(tokenizer, data.train, cfg.data.max_seq_len)
    spec = ft.plan_finetune(cfg.train, cfg.scaling, cfg.dev, len(examples))
    logger.info("%d training rows (rounds %s; %d truncated to %d tokens), %d dev records (%s); %d epochs, %d steps",
                len(examples), data.rounds_per_row, truncated, cfg.data.max_seq_len, len(data.dev), data.dev_source,
                spec.epochs, spec.total_steps)
    identity = cfg.model_dump(mode="json", by_alias=True)
    identity["run"].pop("max_failures")
    ft.check_run_identity(run_dir, identity | {"data_fingerprint": data.fingerprint})

    full = cfg.mode == "full"
    dtype = "bfloat16" if cfg.scaling.use_bf16 else "float32"
    task = ft.FinetuneTask(
        build_model=partial(ft.build_finetune_model, model_path=model_path, mode=cfg.mode, lora=cfg.lora,
                            seed=cfg.train.seed, init_kind=init.kind, init_path=init.path, dtype=dtype,
                            gradient_checkpointing=cfg.train.gradient_checkpointing),
        examples=examples, collate=partial(collate, pad_token_id=tokenizer.pad_token_id), loss_fn=lm_loss,
        length=example_tokens, save=ft.save_full if full else save_adapter, load=ft.load_full if full else load_adapter,
        tokenizer_path=model_path, dev_prompts=[build_messages(r)[:-1] for r in data.dev],
        dev_references=[r.output for r in data.dev], full_weights=full)
    best, state = ft.fit_finetune(task, spec, scaling=cfg.scaling, storage=Path(cfg.run.output_dir).resolve(),
                                  name=cfg.run.name, max_failures=cfg.run.max_failures)

    this_round = {
        "run": cfg.run.name, "max_round": cfg.data.max_round, "data": cfg.data.path, "rows": len(examples),
        "rows_per_round": {str(k): v for k, v in data.rounds_per_row.items()}, "truncated": truncated,
        "init": init.source, "mode": cfg.mode, "epochs": spec.epochs, "steps": state["global_step"],
        "dev": {"source": data.dev_source, "records": len(data.dev)},
        "dev_rouge_l_start": state["dev_rouge_l_start"],
        "probe_loss_start": state["probe_loss_start"], "epoch_probe_loss": [e["probe_loss"] for e in state["epochs"]],
        "epoch_train_loss": [e["train_loss"] for e in state["epochs"]],
        "dev_rouge_l": [e["dev_rouge_l"] for e in state["epochs"]],
        "best_epoch": state["best"]["epoch"], "best_dev_rouge_l": state["best"]["dev_rouge_l"],
    }
    summary = this_round | {
        "model_dir": str(run_dir / "model"), "export": cfg.export, "base_model": cfg.model.name,
        "strategy": cfg.scaling.strategy, "workers": cfg.scaling.num_workers, "losses": state["losses"],
        "dev_samples": next(e["dev_samples"] for e in state["epochs"] if e["epoch"] == state["best"]["epoch"]),
        "attempt_start_steps": state["starts"], "checkpoint": str(best), "wall_time_s": round(time.time() - start, 1),
    }
    summary["rounds"] = [*init.prior_rounds, this_round | {"wall_time_s": summary["wall_time_s"]}]
    merge_base = init.path if init.kind == "merged" else model_path
    export_model_dir(best / "model", run_dir / "model", fmt=cfg.export, base_model=cfg.model.name,
                     tokenizer_path=model_path, merge_base_path=merge_base, dtype=dtype, summary=summary)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    main(sys.argv[1:])
