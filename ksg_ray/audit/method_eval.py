"""`ksg eval`'s parts: the model under test, the audit's inputs, the privacy audit, the printed summary.

Run where the audit inputs (canary secrets, member records) may be read: the client or its auditor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ksg_ray.audit.config import EvalConfig
from ksg_ray.common.records import Record, load_records
from ksg_ray.common.run_layout import RunLayout, epsilon_label
from ksg_ray.engines import SamplingParams, build_engine

__all__ = ["ScoredOnce", "audit_inputs", "budget_coverage", "format_summary", "load_model", "run_privacy_audit",
           "synthetic_fidelity"]

logger = logging.getLogger(__name__)


def load_model(cfg: EvalConfig, model_path: str, adapter_path: str | None) -> Any:
    """The engine contract for `model_path` (+ adapter): a Ray Data actor pool, or one engine in this process;
    either scores each (prompt, answer) once (`ScoredOnce`)."""
    if cfg.engine.ray:
        from ksg_ray.engines.batch_inference import RayDataModel

        return ScoredOnce(RayDataModel(cfg.engine.kind, model_path, adapter_path, batch_size=cfg.engine.batch_size,
                                       max_actors=cfg.engine.max_actors, num_cpus=cfg.engine.num_cpus,
                                       num_gpus=cfg.engine.num_gpus,
                                       engine_kwargs=cfg.engine.engine_kwargs() or None))
    return ScoredOnce(build_engine(cfg.engine.kind, model_path, adapter_path, **cfg.engine.engine_kwargs()))


class ScoredOnce:
    """An engine whose `score` keeps what it computed: the held-out answer loss and the membership attack's
    non-members score the same (question, reference answer) pairs, so an evaluation scores each once (8 of the
    embedded default's 20 attack records). Everything else goes to the engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._scores: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        keys = [json.dumps([p, a]) for p, a in zip(prompts, answers, strict=True)]
        todo = {k: i for i, k in enumerate(keys) if k not in self._scores}
        if todo:
            idx = list(todo.values())
            new = self.engine.score([prompts[i] for i in idx], [answers[i] for i in idx])
            self._scores.update(zip(todo, new, strict=True))
        return [self._scores[k] for k in keys]


def audit_inputs(cfg: EvalConfig, layout: RunLayout, heldout: str) -> dict[str, Any]:
    """Read and check every audit input before any model loads (a bad file fails in seconds, not after generation).

    Raises:
        ValueError: an input is malformed, or a record is both a member and a non-member.
    """
    from ksg_ray.client.canary import read_secrets

    a = cfg.audit
    secrets = read_secrets(a.secrets) if a.secrets else None
    canary_records = load_records(a.canary_records) if a.canary_records else None
    members_src = a.members or a.canary_records
    members = load_records(members_src, limit=a.limit) if members_src else []
    nonmembers = load_records(a.nonmembers or heldout, limit=a.limit) if members else []
    both = {_key(r) for r in members} & {_key(r) for r in nonmembers}
    if both:
        raise ValueError(f"{len(both)} record(s) are both members ({members_src}) and non-members "
                         f"({a.nonmembers or heldout}): membership inference needs disjoint sets")
    synthetic = a.synthetic or (layout.synthetic if layout.synthetic.is_file() else None)
    if not a.scan_synthetic:
        synthetic = None
    bundle = a.bundle or cfg.model.bundle or (layout.bundle_dir if layout.privacy.is_file() else None)
    return {"secrets": secrets, "canary_records": canary_records, "members": members, "nonmembers": nonmembers,
            "members_source": members_src, "synthetic": synthetic, "bundle": bundle}


def _key(r: Record) -> tuple[str, str, str]:
    return r.instruction, r.input, r.output


def run_privacy_audit(cfg: EvalConfig, model: Any, inputs: dict[str, Any], bundle_privacy: dict | None,
                      timings: dict[str, float]) -> dict[str, Any]:
    """Canary rates (synthetic set, targeted generations) and membership inference, as far as the inputs allow;
    adds each part's seconds to `timings`. The generations are not kept: they may hold secrets."""
    from ksg_ray.audit.privacy_audit import (
        canary_rate_generations,
        membership_inference,
        read_dataset_texts,
        scan_canaries,
    )

    audit: dict[str, Any] = {"canary_synthetic": None, "canary_generations": None, "mia": None,
                             "bundle_privacy": bundle_privacy}
    secrets = inputs["secrets"]
    if secrets is not None and inputs["synthetic"] is not None:
        audit["canary_synthetic"] = scan_canaries(read_dataset_texts(inputs["synthetic"]), secrets).summary()
        audit["canary_synthetic"]["dataset"] = str(inputs["synthetic"])
    if secrets is not None:
        t = time.perf_counter()
        sampling = SamplingParams(temperature=cfg.audit.temperature, max_new_tokens=cfg.audit.max_new_tokens,
                                  n=cfg.audit.samples, seed=cfg.run.seed)
        scan, _ = canary_rate_generations(model, secrets, inputs["canary_records"], sampling)
        audit["canary_generations"] = scan.summary()  # the answers are not written: they may hold secrets
        timings["canary_generations_s"] = time.perf_counter() - t
    if inputs["members"]:
        t = time.perf_counter()
        mia = membership_inference(model, inputs["members"], inputs["nonmembers"])
        audit["mia"] = mia.summary() | {"members_source": inputs["members_source"],
                                        "nonmembers_source": cfg.audit.nonmembers or cfg.data.path}
        if cfg.audit.reference_model is not None:
            from ksg_ray.common.hub import resolve_model

            reference = load_model(cfg, resolve_model(cfg.audit.reference_model), None)
            audit["mia_reference"] = membership_inference(model, inputs["members"], inputs["nonmembers"],
                                                          reference=reference).summary()
        timings["mia_s"] = time.perf_counter() - t
    return audit


def budget_coverage(model_path: str, records: list[Record], max_new_tokens: int) -> float | None:
    """The share of reference answers that fit in the answer budget; warns below 90% (the budget would cut the
    fine-tuned models, which imitate the references' length, more than the base)."""
    from transformers import AutoTokenizer

    from ksg_ray.audit.utility import reference_coverage

    coverage = reference_coverage(AutoTokenizer.from_pretrained(model_path), records, max_new_tokens)
    if coverage is not None and coverage < 0.9:
        logger.warning("data.max_new_tokens=%d covers only %.0f%% of the reference answers (aim for >= 90%%)",
                       max_new_tokens, 100 * coverage)
    return coverage


def synthetic_fidelity(cfg: EvalConfig, inputs: dict[str, Any], held_out: list[Record], plot: Path,
                       timings: dict[str, float]) -> dict[str, Any] | None:
    """The synthetic set's fidelity and copy figures against the training records (`audit.canary_records` or
    `audit.members`, read whole) and the held-out split; None without a synthetic set or training records."""
    source = cfg.audit.members or cfg.audit.canary_records
    if inputs["synthetic"] is None or source is None or not held_out:
        return None
    from ksg_ray.audit.fidelity import fidelity_report
    from ksg_ray.audit.privacy_audit import read_dataset_rows

    t = time.perf_counter()
    rows = read_dataset_rows(inputs["synthetic"])
    out = fidelity_report(rows, load_records(source), held_out, plot=plot) | {"dataset": str(inputs["synthetic"])}
    timings["fidelity_s"] = time.perf_counter() - t
    return out


def format_summary(result: dict, out: Path) -> str:
    def f(x: Any, spec: str = ".3f") -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    m, p, c = result["metrics"], result["privacy"], result["counts"]
    judge = c.get("judge") or {}
    lines = [
        f"method      {result['method']} (ε={epsilon_label(result['epsilon'])}) on {result['n']} records of "
        f"{result['data']}: {c['answered']} answered, {c['failed']} failed, {c['unfinished']} cut at max_new_tokens",
        f"utility     ROUGE-1 {f(m['rouge1'])}  ROUGE-2 {f(m['rouge2'])}  ROUGE-L {f(m['rougeL'])}  "
        f"BLEU {f(m['bleu'], '.2f')}  MiniLM cos {f(m['embedding_cosine'])}",
        f"judge       {f(m['judge'], '.2f')} / 10 ({judge.get('parsed', 0)} parsed, {judge.get('unparsed', 0)} "
        f"unparseable, {judge.get('failed', 0)} failed)" if result["judge_model"] else "judge       not run",
        f"privacy     canary rate synthetic {f(p['canary_rate_synthetic'])}  generations "
        f"{f(p['canary_rate_generations'])}  MIA AUC {f(p['mia_auc'])}",
        f"finishing   unfinished {f(m.get('unfinished_rate'))}  loops (repeated 6-gram) {f(m.get('loop_rate'))}  "
        f"answer loss {f(m.get('answer_loss'))}  budget covers {f(c.get('reference_coverage'), '.0%')} of references",
        *_fidelity_lines(result.get("fidelity")),
        f"time        {result['timings']}",
        f"written     {out}",
    ]
    return "\n".join(lines)


def _fidelity_lines(fid: dict | None) -> list[str]:
    if not fid or not fid.get("rows"):
        return []
    mauve = "—" if fid["mauve"] is None else f"{fid['mauve']:.3f}"
    return [f"fidelity    {fid['rows']} synthetic rows: nearest-real share {fid['nearest_real_share']:.2f} "
            f"(cosine >= {fid['nearest_real_threshold']:.3f})  MAUVE {mauve}  copy share {fid['copy_share']:.3f}  "
            f"loops {fid['loop_share']:.3f}  other language {fid['other_language_share']:.3f}"]
