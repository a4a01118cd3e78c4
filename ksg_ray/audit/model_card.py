"""Model cards: a `README.md` in the Hugging Face style beside each model a run trained, written after its
evaluation, so the folder says what it is without the run directory: the base model, the method, the training
data (described, never quoted), ε and δ with the accountant, and what it was evaluated on with which result.

Only aggregates go in: the evaluation's means and intervals and the bundle's privacy report, both already part
of what leaves the client. A model trained on the private records without DP says so in its first line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ksg_ray.common.run_layout import epsilon_label

__all__ = ["METHODS", "model_card", "write_model_card"]

METHODS = {
    "pipeline": "KnowledgeSG + RewardDS: fine-tuned on synthetic data sampled from the client's DP generator, "
                "filtered, answered by the professional model, ranked by the client's DP reward model and refined",
    "knowledgesg": "KnowledgeSG: fine-tuned on synthetic questions from the client's DP generator, filtered and "
                   "answered by the professional model",
    "rewardds": "RewardDS: fine-tuned on the DP generator's synthetic data, ranked and refined with the client's "
                "DP reward model",
    "dp_synthetic": "fine-tuned on the DP generator's own synthetic questions and answers, unfiltered",
    "dp_finetune": "DP-SGD LoRA fine-tuning on the client's records (the DP generator itself)",
    "non_private": "LoRA fine-tuning on the client's records WITHOUT differential privacy (a reference; NOT DP)",
}
CARD_METRICS = ("answer_loss", "rougeL", "rouge1", "rouge2", "bleu", "embedding_cosine", "unfinished_rate", "loop_rate")


def model_card(*, method: str, base_model: str, library: str, result: dict[str, Any],
               privacy: dict[str, Any] | None, training: dict[str, Any] | None = None) -> str:
    """The card's Markdown.

    Args:
        method: the run's method name (`dp_finetune@4` is the DP generator at ε = 4).
        base_model: the public base model's name.
        library: "peft" (a LoRA adapter) or "transformers" (full weights).
        result: the method's evaluation (`<run>/eval/<method>.json`).
        privacy: the bundle's privacy report when the model is built from the bundle's outputs, else None.
        training: the fine-tune's summary (`finetune_summary.json`) for a model trained on synthetic data.
    """
    family = method.split("@")[0]
    epsilon = result.get("epsilon")
    not_dp = epsilon is not None and math.isinf(epsilon)
    md = ["---", f"base_model: {base_model}", f"library_name: {library}",
          "tags: [ksg-ray, " + ("not-differentially-private" if not_dp else "differential-privacy") + f", {family}]",
          "---", "", f"# {method} (ksg-ray)", ""]
    if not_dp:
        md += ["**NOT DIFFERENTIALLY PRIVATE.** This model was trained on the client's private records without DP. "
               "It must stay on the client.", ""]
    md += [f"- **Base model:** `{base_model}`", f"- **Method:** {METHODS.get(family, family)}"]
    if training:
        rounds = ", ".join(f"round {k}: {v}" for k, v in sorted(training.get("rows_per_round", {}).items()))
        md += [f"- **Training data:** {training.get('rows')} synthetic question-answer rows ({rounds}) written on the "
               "server from the client's DP bundle; no private record was read to train it.",
               f"- **Training:** {training.get('epochs')} epochs; kept the best by ROUGE-L on a public dev split "
               f"(epoch {training.get('best_epoch')})."]
    elif family in ("dp_finetune", "non_private"):
        md += ["- **Training data:** the client's private records (question and answer), on the client."]
    md += ["", "## Privacy", ""]
    if not_dp:
        md += ["ε = ∞ (no DP)."]
    elif privacy and family not in ("dp_finetune", "non_private"):
        how = privacy.get("composition", "composition of the mechanisms")
        md += [f"(ε = {privacy['epsilon']:.3g}, δ = {privacy['delta']:g})-DP with respect to the client's records, by "
               "post-processing: the model saw only outputs of the client's DP bundle. Accountant: "
               f"{privacy.get('accountant', '?').upper()} ({how}).",
               "", "| mechanism | σ | sampling rate q | steps | records |", "|---|---|---|---|---|"]
        md += [f"| {m['name']} | {m['noise_multiplier']:.4g} | {m['sample_rate']:.4g} | {m['steps']} | "
               f"{m.get('records', '?')} |" for m in privacy.get("mechanisms", [])]
        if privacy.get("not_dp"):
            md += ["", f"Not DP parts of the release: {privacy['not_dp']}."]
    elif epsilon is not None:
        md += [f"ε = {epsilon_label(epsilon)} (DP-SGD, δ as in the client's privacy settings), as the client's ledger "
               "records it."]
    else:
        md += ["Never trained on private records."]
    metrics, ci = result.get("metrics") or {}, result.get("metrics_ci") or {}
    md += ["", "## Evaluation", "",
           f"{result.get('n')} held-out records of the client's domain (never trained on), greedy decoding"
           + (f", engine {result['engine']}" if result.get("engine") else "") + ". 95% bootstrap intervals.", "",
           "| metric | value | 95% interval |", "|---|---|---|"]
    for k in CARD_METRICS:
        if metrics.get(k) is not None:
            lo_hi = f"[{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if ci.get(k) else "—"
            md.append(f"| {k} | {metrics[k]:.3f} | {lo_hi} |")
    md += ["", "answer_loss: mean negative log-likelihood per token of the reference answers (lower is better); "
           "unfinished_rate: answers cut before their end of turn; loop_rate: answers with a repeated word 6-gram.",
           ""]
    return "\n".join(md)


def write_model_card(model_dir: Path, *, method: str, result: dict[str, Any], privacy: dict[str, Any] | None,
                     base_model: str) -> Path:
    """Write `model_dir/README.md` (replacing an older card); reads the fine-tune summary beside it if any."""
    model_dir = Path(model_dir)
    summary = model_dir / "finetune_summary.json"
    training = json.loads(summary.read_text()) if summary.is_file() else None
    library = "peft" if (model_dir / "adapter_config.json").is_file() else "transformers"
    card = model_card(method=method, base_model=base_model, library=library, result=result, privacy=privacy,
                      training=training)
    path = model_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
