"""CLIENT SIDE when auditing — utility metrics and privacy audit of one model; writes <run>/eval/<method>.json.

    ksg eval configs/evaluate.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml

Utility on a held-out split (ROUGE-1/2/L, BLEU, MiniLM cosine, a professional model's 1-10 grade) needs only
public data. The privacy audit reads the canary secrets and the member records: run it where those may be
read (the client or its auditor), never on the synthesis server; without `audit.*` inputs the job reads public
data only and runs anywhere. `ksg report RUN_DIR` then compares methods.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ksg_ray.audit.config import EvalConfig, resolve_eval_model
from ksg_ray.audit.method_eval import (
    audit_inputs,
    budget_coverage,
    format_summary,
    load_model,
    run_privacy_audit,
    synthetic_fidelity,
)
from ksg_ray.common.config import job_config
from ksg_ray.common.jsonl import write_jsonl_atomic
from ksg_ray.common.records import load_records
from ksg_ray.common.run_layout import RunLayout, write_eval_result
from ksg_ray.engines import SamplingParams

logger = logging.getLogger("ksg.evaluate")
CONFIG = EvalConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])

    from ksg_ray.audit.privacy_audit import bundle_privacy_flags
    from ksg_ray.audit.utility import evaluate_utility

    layout = RunLayout(cfg.run.dir, cfg.run.results)
    out = cfg.run.output or layout.eval_file(cfg.run.method)
    records = load_records(cfg.data.path, limit=cfg.data.limit)
    inputs = audit_inputs(cfg, layout, cfg.data.path)
    bundle_privacy = bundle_privacy_flags(inputs["bundle"]) if inputs["bundle"] else None
    model_path, adapter_path, model_desc = resolve_eval_model(cfg.model)
    model = load_model(cfg, model_path, adapter_path)
    judge = None
    if cfg.judge.model is not None:
        from ksg_ray.common.hub import resolve_model

        judge = load_model(cfg, resolve_model(cfg.judge.model), None)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    coverage = budget_coverage(model_path, records, cfg.data.max_new_tokens)
    utility = evaluate_utility(model, records, SamplingParams(temperature=0.0, max_new_tokens=cfg.data.max_new_tokens),
                               judge=judge, judge_max_new_tokens=cfg.judge.max_new_tokens, embeddings=cfg.embeddings)
    timings["utility_s"] = time.perf_counter() - started
    utility.counts["reference_coverage"] = coverage

    audit = run_privacy_audit(cfg, model, inputs, bundle_privacy, timings)
    fidelity = synthetic_fidelity(cfg, inputs, records, layout.fidelity_plot(cfg.run.method), timings)
    timings["total_s"] = time.perf_counter() - started

    epsilon = cfg.run.epsilon
    if epsilon is None and cfg.model.bundle is not None and bundle_privacy is not None:
        epsilon = bundle_privacy.get("epsilon")
    result = {
        "method": cfg.run.method, "family": cfg.run.family or cfg.run.method, "epsilon": epsilon,
        "metrics": utility.metrics, "metrics_ci": utility.ci,
        "privacy": {"canary_rate_synthetic": (audit["canary_synthetic"] or {}).get("rate"),
                    "canary_rate_generations": (audit["canary_generations"] or {}).get("rate"),
                    "mia_auc": (audit["mia"] or {}).get("auc")},
        "fidelity": fidelity,
        "model": model_desc, "n": len(records), "data": cfg.data.path, "counts": utility.counts,
        "judge_model": cfg.judge.model, "engine": cfg.engine.kind, "audit": audit,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    # the predictions hold the held-out questions and references: on the client's side of the run layout
    predictions = layout.eval_predictions(cfg.run.method) if cfg.run.output is None else \
        Path(out).with_suffix(".predictions.jsonl")
    write_jsonl_atomic(predictions, utility.rows)
    write_eval_result(out, result)
    print(format_summary(result, out))
    return result


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    main(sys.argv[1:])
