"""CLIENT SIDE — DP LoRA fine-tuning of the generator on the client's private records; writes the transfer bundle.

    ksg dp-train configs/dp_finetune.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/dp_finetune.py --config configs/dp_finetune.yaml

Reads private records: run it only where the data may be read. Only the bundle (adapter, configs, privacy
report) leaves this machine. A rerun with the same `run.output_dir`/`run.name` resumes where it died. With
`privacy.publish=false` (an evaluation-only run: the non-private baseline, the ε grid) nothing leaves: the
adapter is kept in `<run.output_dir>/<run.name>/adapter`, and the client's ledger records the run as unpublished.
"""

from __future__ import annotations

import logging
import math
import sys
from functools import partial
from pathlib import Path

from ksg_ray.client.config import DPFinetuneConfig
from ksg_ray.client.dp_trainer import DPTask
from ksg_ray.client.privacy.engine import PrivacyEngine
from ksg_ray.common.config import job_config

logger = logging.getLogger("ksg.dp_finetune")
CONFIG = DPFinetuneConfig  # the config this recipe takes (`ksg config show`)


def prepare(cfg: DPFinetuneConfig):
    """Read, validate and tokenize the private records (fails before any worker starts)."""
    from transformers import AutoTokenizer

    from ksg_ray.common.chat_format import collate, tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records

    model_path = resolve_model(cfg.model.name)
    records = load_records(cfg.data.path, limit=cfg.data.limit)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, truncated = tokenize_records(tokenizer, records, cfg.data.max_seq_len, cfg.data.question_loss)
    return model_path, records, examples, truncated, partial(collate, pad_token_id=tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])

    from ksg_ray.common.lora import example_tokens, lm_builder, lm_loss, load_adapter, save_adapter

    model_path, records, examples, truncated, collate_fn = prepare(cfg)
    n = len(examples)
    engine = PrivacyEngine(cfg.privacy, records)
    spec = engine.make_private("generator", n, cfg.train, cfg.scaling, cfg.run)
    # The truncation count is a statistic of the private data: it stays in the client's log, not in the bundle.
    logger.info("%d private records (%d truncated to %d tokens); q=%.4f, %d steps, σ=%.4f", n, truncated,
                cfg.data.max_seq_len, spec.sample_rate, spec.steps, spec.noise_multiplier)
    task = DPTask(name="generator", build_model=lm_builder(model_path, cfg.lora, cfg.train.seed), examples=examples,
                  collate=collate_fn, loss_fn=lm_loss, save=save_adapter, load=load_adapter,
                  length=example_tokens)
    ckpt, metrics = engine.fit(task, cfg.scaling, cfg.run)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if cfg.privacy.publish:
        bundle, report = engine.publish(cfg.run.bundle_dir, "generator", ckpt / "model",
                                        staging=run_dir / "generator_component",
                                        model_ref={"base_model": cfg.model.name, "tokenizer": cfg.model.name,
                                                   "kind": "causal-lm-lora"})
    else:  # evaluation only: the adapter stays on the client, its ε is its own
        bundle, report = engine.keep(ckpt / "model", run_dir / "adapter")
    summary = {"bundle": str(bundle), "epsilon": report["epsilon"], "epsilon_rdp": report["epsilon_rdp"],
               "noise_multiplier": spec.noise_multiplier, "sample_rate": spec.sample_rate, "steps": spec.steps,
               "final_loss": metrics.get("loss"), "published": cfg.privacy.publish,
               "checkpoint": str(ckpt)}
    print(format_summary(ckpt, summary))
    return summary


def format_summary(ckpt: Path, summary: dict) -> str:
    import json

    progress = json.loads((ckpt / "progress.json").read_text())
    losses = [x for x in progress["losses"] if not math.isnan(x)]
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    b_norm = adapter_b_norm(ckpt / "model" / "adapter_model.safetensors")
    return "\n".join([
        f"bundle      {summary['bundle']}" if summary["published"] else
        f"adapter     {summary['bundle']} (evaluation only: unpublished, it stays on the client)",
        f"privacy     ε={summary['epsilon']:.3f} (PRV; RDP {summary['epsilon_rdp']:.3f}) "
        f"σ={summary['noise_multiplier']:.4f} q={summary['sample_rate']:.4f} steps={summary['steps']}",
        f"loss        on a fixed probe of records {progress['probe_loss_start']:.4f} → "
        f"{progress['probe_loss_end']:.4f}; batch loss first {k} steps {first:.4f} → last {k} steps {last:.4f}",
        f"adapter     ‖LoRA B‖ = {b_norm:.4f} (initialised at 0)",
    ])


def adapter_b_norm(path: Path) -> float:
    """LoRA B starts at exactly zero: its norm is how far the adapter moved from its initial value."""
    from safetensors.torch import load_file

    return math.sqrt(sum(float((v.float() ** 2).sum()) for k, v in load_file(str(path)).items() if "lora_B" in k))


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    main(sys.argv[1:])
