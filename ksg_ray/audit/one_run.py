"""CLIENT SIDE (the auditor) — one-run privacy audit of the DP generator (Steinke, Nasr & Jagielski 2023).

`ksg audit one-run [CONFIG] [key=value ...]` takes the DP generator's config (`model.*`, `lora.*`, `data.*`,
`privacy.*`, `train.*`, `scaling.*`, `run.output_dir`) plus an `audit` section, and plays the game of
arXiv 2305.08846 (Algorithm 1) once:

1. Draw m canaries: records whose question and answer are random vocabulary words (a secret no model guesses),
   and include each independently with probability ½.
2. Train once, through the generator's own code: the same `DPTask` (LoRA, `lm_loss`), `PrivacyEngine`, DP-SGD
   step (`ksg_ray.client.privacy.dp_sgd`) and accountant, on the included canaries alone (default) or, with
   `audit.records=true`, on the private records plus the included canaries.
3. Score every canary by how much training lowered its loss (the base model's loss minus the trained model's, on
   the tokens the generator trains on); guess "in" for the top k and "out" for the bottom k.
4. Turn v correct guesses out of r = 2k into a lower bound on ε at the run's δ (`epsilon_lower_bound`): the
   largest ε at which an (ε, δ)-DP training would make v or more correct guesses with probability below
   1 − confidence.

A bound above the claimed ε (the accountant's ε for this run's σ, q and steps) shows, at that confidence, that
the training does not give the privacy it claims: noise not added, clipping broken, an accountant bug. A bound
below it shows only that this attack found no violation. The bound cannot exceed what m canaries allow: with
every one of r guesses right, about ln(1 / ((1 − confidence)^(-1/r) − 1)) (r = 20 at 95%: 1.82), so a run with few
canaries audits small ε only.

Privacy of the records: trained on canaries alone (the default), the audit reads no private record and is not a
run on the records: the client's ledger is unchanged, and the run is accounted in a ledger of its own, beside
its canaries (`<run.output_dir>/audit/<audit.name>/ledger/`). With `audit.records=true` it is a DP generator
run on the records (with the canaries added), recorded in the client's ledger (`privacy.ledger_dir`) like any
other run on them, and counted in the composed ε and the budget unless `privacy.publish=false` records it as
evaluation-only; its adapter never leaves the client.

Both modes plan the run as the generator does: q = B/N with N the records the run trains on, so N (and q) moves
with how many canaries were drawn in; the accountant, like the generator's, treats q as fixed.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from ksg_ray.client.config import DPFinetuneConfig
from ksg_ray.common.config import KsgConfigError, StrictModel
from ksg_ray.common.records import Record

logger = logging.getLogger(__name__)

__all__ = ["OneRunAuditConfig", "OneRunSection", "add_audit_args", "canary_words", "count_correct",
           "epsilon_lower_bound", "format_result", "guess", "make_canaries", "p_value", "recipe_argv",
           "run_audit", "run_one_run_audit", "score_canaries"]

METHOD = "one-run audit (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846)"
SCORE = "loss drop: base model loss minus trained model loss, on the tokens the generator trains on"
CANARY_INSTRUCTION = "Recite."  # short: without one, a chat template may add a long default system message
_WORD = re.compile(r"^ [a-z]{4,10}$")  # one vocabulary token: a space and a plain lower-case word


class OneRunSection(StrictModel):
    """The canary game of the one-run audit (`audit.*`)."""

    canaries: int = Field(64, ge=2, description="m: canaries drawn, each trained on with probability 1/2")
    k: int = Field(10, ge=1, description="guesses on each side: top k 'in', bottom k 'out' (2k <= m); fixed "
                                         "before the run, so the confidence holds as stated")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the ε lower bound")
    question_words: int = Field(4, ge=1, description="random vocabulary words in each canary's question")
    secret_words: int = Field(8, ge=1, description="random vocabulary words in each canary's answer (the secret)")
    records: bool = Field(False, description="also train on the private records (data.*): the audit is then a run "
                                             "on the records, counted in their ledger and budget")
    name: str = Field("one_run", description="the audit's folder <run.output_dir>/audit/<name>/ and result "
                                             "<name>.json; an unfinished audit of the same name resumes")
    seed: int | None = Field(None, description="tests only: seed of the canaries and their inclusion (None = "
                                               "a secret random seed)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+", v) or v.startswith("."):
            raise ValueError(f"must use letters, digits and _.=- only (it names a folder), got {v!r}")
        return v


class OneRunAuditConfig(DPFinetuneConfig):
    """`ksg audit one-run`: the DP generator's config and the one-run canary game (`audit.*`)."""

    audit: OneRunSection = OneRunSection()

    @model_validator(mode="after")
    def _enough_canaries(self) -> OneRunAuditConfig:
        if 2 * self.audit.k > self.audit.canaries:
            raise ValueError(f"audit.k={self.audit.k} guesses on each side need audit.canaries >= {2 * self.audit.k}")
        return self


# ---- the bound -------------------------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """How likely an (ε, δ)-DP training lets r guesses about m canaries be right v or more times.

    Steinke, Nasr & Jagielski 2023 (Theorem 5.2 with δ; their Algorithm 2): with q = e^ε / (1 + e^ε),
    β = P[Binomial(r, q) ≥ v] and α = max over i = 1..v of P[v − i ≤ Binomial(r, q) < v] / i, the probability
    is at most β + 2mδ·α.

    Args:
        m: canaries, each included independently with probability ½.
        r: guesses made (the rest abstain).
        v: correct guesses.
        epsilon, delta: the DP claim tested.

    Raises:
        ValueError: not 0 ≤ v ≤ r ≤ m, ε < 0, or δ outside [0, 1].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}")
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    from scipy import special, stats

    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= B < v] for i = 1..v
    alpha = float(np.max(below / i))
    return min(beta + alpha * 2 * m * delta, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The ε lower bound of the one-run audit: the largest ε whose (ε, δ) claim v correct guesses out of r reject
    at `confidence` (p-value ≤ 1 − confidence); 0 when even ε = 0 is not rejected.

    Examples:
        >>> round(epsilon_lower_bound(m=64, r=20, v=20, delta=1e-5), 3)
        1.821
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy import optimize

    significance = 1.0 - confidence

    def excess(eps: float) -> float:  # > 0 where the claim is rejected; p_value grows with ε
        return significance - p_value(m, r, v, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
    return float(optimize.brentq(excess, lo, hi, xtol=1e-9, rtol=1e-12))


def guess(scores: np.ndarray, k: int) -> np.ndarray:
    """+1 ("in") for the k highest scores, −1 ("out") for the k lowest, 0 (abstain) for the rest."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    guesses = np.zeros(len(order), dtype=int)
    guesses[order[:k]] = 1
    guesses[order[len(order) - k:]] = -1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r, v): how many guesses were made and how many were right."""
    guesses, included = np.asarray(guesses), np.asarray(included, dtype=bool)
    right = ((guesses == 1) & included) | ((guesses == -1) & ~included)
    return int(np.count_nonzero(guesses)), int(right.sum())


# ---- the canaries ----------------------------------------------------------------------------------------------


def canary_words(tokenizer: Any) -> list[str]:
    """Plain lower-case words that are one token each in `tokenizer`'s vocabulary (SmolLM2: about 17,600)."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return sorted({w.strip() for w in decoded if _WORD.match(w)})


def make_canaries(words: list[str], m: int, question_words: int, secret_words: int, seed: int) -> list[Record]:
    """m records whose question and answer are words drawn at random from `words` (with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(words), size=(m, question_words + secret_words))
    return [Record(CANARY_INSTRUCTION, " ".join(words[j] for j in row[:question_words]).capitalize() + "?",
                   " ".join(words[j] for j in row[question_words:]) + ".", f"canary:{i}")
            for i, row in enumerate(picks)]


def score_canaries(model_path: str, adapter_dir: Path, examples: list, collate_fn,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-canary loss under the base model and under the trained adapter (the tokens trained on, as trained)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ksg_ray.common.lora import lm_loss

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    base_losses, trained_losses = [], []
    with torch.no_grad():
        for j in range(0, len(examples), batch_size):
            batch = collate_fn(examples[j:j + batch_size])
            trained_losses.append(lm_loss(model, batch))
            with model.disable_adapter():
                base_losses.append(lm_loss(model, batch))
    return torch.cat(base_losses).numpy(), torch.cat(trained_losses).numpy()


# ---- the game --------------------------------------------------------------------------------------------------


def _game(cfg: OneRunAuditConfig, audit_dir: Path, tokenizer) -> tuple[list[Record], np.ndarray]:
    """The canaries and which are included: drawn fresh, or read back when resuming an unfinished audit."""
    from ksg_ray.common.jsonl import write_json_atomic
    from ksg_ray.common.records import load_records, write_jsonl

    game_file, settings = audit_dir / "game.json", cfg.audit.model_dump(exclude={"name", "records", "seed"})
    if game_file.is_file():
        game = json.loads(game_file.read_text())
        if game["settings"] != settings or cfg.audit.seed not in (None, game["seed"]):
            raise KsgConfigError("audit", [f"{audit_dir} holds an unfinished audit with other settings "
                                           f"{game['settings']}: use another audit.name or delete that folder"])
        return load_records(audit_dir / "canaries.jsonl"), np.array(game["included"], dtype=bool)
    seed = cfg.audit.seed if cfg.audit.seed is not None else secrets.randbits(63)
    canaries = make_canaries(canary_words(tokenizer), cfg.audit.canaries, cfg.audit.question_words,
                             cfg.audit.secret_words, seed)
    included = np.random.default_rng([seed, 1]).random(cfg.audit.canaries) < 0.5
    audit_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(canaries, audit_dir / "canaries.jsonl")
    write_json_atomic(game_file, {"settings": settings, "seed": seed, "included": included.tolist()})
    return load_records(audit_dir / "canaries.jsonl"), included


def run_one_run_audit(cfg: OneRunAuditConfig) -> dict[str, Any]:
    """Play the one-run game once (see the module docstring) and write `<run.output_dir>/audit/<name>.json`.

    Returns:
        The result: the ε lower bound, the claimed ε, m, k, r, v, the confidence, the run's σ, q, steps, what
        it trained on and whether the client's ledger counts it, and every canary's score and inclusion.

    Raises:
        KsgConfigError: an audit of this name already finished, or an unfinished one has other settings.
        LedgerError: δ ≥ 1/N or the budget (as for the generator).
    """
    from functools import partial

    from transformers import AutoTokenizer

    from ksg_ray.client.dp_trainer import DPTask
    from ksg_ray.client.privacy.accountant import Mechanism, epsilon_for
    from ksg_ray.client.privacy.engine import PrivacyEngine
    from ksg_ray.common.chat_format import collate, tokenize_records
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.jsonl import write_json_atomic
    from ksg_ray.common.lora import example_tokens, lm_builder, lm_loss, load_adapter, save_adapter
    from ksg_ray.common.records import load_records
    from ksg_ray.common.run_layout import encode_epsilon

    audit_root = Path(cfg.run.output_dir) / "audit"
    audit_dir, result_file = audit_root / cfg.audit.name, audit_root / f"{cfg.audit.name}.json"
    if result_file.is_file():
        raise KsgConfigError("audit", [f"audit.name={cfg.audit.name} has finished ({result_file}): use another "
                                       "audit.name, or delete that file and its folder to audit again"])
    model_path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    canaries, included = _game(cfg, audit_dir, tokenizer)
    canary_examples, _ = tokenize_records(tokenizer, canaries, cfg.data.max_seq_len, cfg.data.question_loss)
    train_records = [c for c, inc in zip(canaries, included, strict=True) if inc]
    train_examples = [e for e, inc in zip(canary_examples, included, strict=True) if inc]
    if not train_records and not cfg.audit.records:
        raise KsgConfigError("audit", [f"no canary of {len(canaries)} was drawn in (probability 2^-m): use more "
                                       "audit.canaries, and another audit.name"])
    n_records = 0
    if cfg.audit.records:  # a run on the private records: the client's ledger and budget count it
        records = load_records(cfg.data.path, limit=cfg.data.limit)
        record_examples, _ = tokenize_records(tokenizer, records, cfg.data.max_seq_len, cfg.data.question_loss)
        n_records, train_examples = len(record_examples), record_examples + train_examples
        engine = PrivacyEngine(cfg.privacy, records + train_records)
    else:  # canaries alone: no private record is read; the run is accounted in a ledger of its own
        privacy = cfg.privacy.model_copy(update={"ledger_dir": audit_dir / "ledger"})
        engine = PrivacyEngine(privacy, train_records)
    run = cfg.run.model_copy(update={"output_dir": audit_dir, "name": "train"})
    spec = engine.make_private("generator", len(train_examples), cfg.train, cfg.scaling, run)
    claimed = epsilon_for(Mechanism("generator", spec.noise_multiplier, spec.sample_rate, spec.steps).history(),
                          cfg.privacy.delta, cfg.privacy.accountant)
    logger.info("one-run audit: %d canaries (%d drawn in) + %d records; q=%.4f, %d steps, σ=%.4f, claimed ε=%s",
                len(canaries), int(included.sum()), n_records, spec.sample_rate, spec.steps, spec.noise_multiplier,
                claimed)
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    task = DPTask(name="generator", build_model=lm_builder(model_path, cfg.lora, cfg.train.seed),
                  examples=train_examples, collate=collate_fn, loss_fn=lm_loss, save=save_adapter, load=load_adapter,
                  length=example_tokens)
    ckpt, _ = engine.fit(task, cfg.scaling, run)

    base_losses, trained_losses = score_canaries(model_path, ckpt / "model", canary_examples, collate_fn)
    scores = base_losses - trained_losses
    guesses = guess(scores, cfg.audit.k)
    r, v = count_correct(guesses, included)
    m, delta = len(canaries), cfg.privacy.delta
    bound = epsilon_lower_bound(m, r, v, delta, cfg.audit.confidence)
    result = {
        "method": METHOD, "epsilon_lower_bound": bound, "claimed_epsilon": encode_epsilon(claimed),
        "delta": delta, "confidence": cfg.audit.confidence, "canaries": m, "k": cfg.audit.k, "guesses": r,
        "correct": v, "members": int(included.sum()), "score": SCORE,
        "trained_on": "records+canaries" if cfg.audit.records else "canaries",
        "records": n_records,
        "ledger": (f"a run on the private records: recorded in {engine.ledger.path}" if cfg.audit.records else
                   "trained on canaries alone: not a run on the private records (the client's ledger is unchanged)"),
        "accountant": cfg.privacy.accountant, "noise_multiplier": spec.noise_multiplier,
        "sample_rate": spec.sample_rate, "steps": spec.steps, "model": cfg.model.name,
        "max_possible_bound": epsilon_lower_bound(m, r, r, delta, cfg.audit.confidence),
        "scores": [float(s) for s in scores], "included": included.tolist(), "guesses_made": guesses.tolist(),
        "mean_loss_drop_members": float(scores[included].mean()) if included.any() else None,
        "mean_loss_drop_nonmembers": float(scores[~included].mean()) if (~included).any() else None,
    }
    write_json_atomic(result_file, result)
    return result | {"result_file": str(result_file)}


def format_result(result: dict[str, Any]) -> str:
    """The audit's summary; its first line is `epsilon lower bound: X (claimed: Y, m=…, k=…, confidence …)`."""
    claimed = result["claimed_epsilon"]
    claimed = "inf" if claimed == "inf" or (isinstance(claimed, float) and math.isinf(claimed)) else f"{claimed:.3f}"
    return "\n".join([
        f"epsilon lower bound: {result['epsilon_lower_bound']:.3f} (claimed: {claimed}, m={result['canaries']}, "
        f"k={result['k']}, confidence {result['confidence']:g}, δ={result['delta']:g})",
        f"guesses     {result['correct']}/{result['guesses']} correct (top {result['k']} 'in', bottom {result['k']} "
        f"'out'; {result['members']} of {result['canaries']} canaries drawn in); at most "
        f"{result['max_possible_bound']:.3f} with every guess right",
        f"run         σ={result['noise_multiplier']:.4f} q={result['sample_rate']:.4f} steps={result['steps']} "
        f"({result['accountant']} accountant); mean loss drop members {_num(result['mean_loss_drop_members'])}, "
        f"non-members {_num(result['mean_loss_drop_nonmembers'])}",
        f"privacy     {result['ledger']}",
        f"result      {result.get('result_file', '')}",
    ])


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ---- the command line ------------------------------------------------------------------------------------------


def add_audit_args(sub: Any) -> None:
    """`ksg audit one-run [CONFIG] [key=value ...]` under `ksg`'s subcommands `sub`."""
    audit = sub.add_parser("audit", help="[client] audit the DP training: an ε lower bound to set beside the claim")
    kinds = audit.add_subparsers(dest="audit_command", required=True)
    p = kinds.add_parser("one-run", help="one-run audit of the DP generator (Steinke, Nasr & Jagielski 2023)",
                         description="Plant m canaries, each trained on with probability 1/2 through the DP "
                                     "generator's training, guess which were in, and print an ε lower bound at the "
                                     "run's δ beside the claimed ε. Takes the generator's config (dp-train) plus "
                                     "audit.*; writes <run.output_dir>/audit/<audit.name>.json.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (the DP generator's, e.g. "
                                                          "configs/dp_finetune.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. audit.canaries=64 privacy.target_epsilon=1")


def recipe_argv(args: Any) -> list[str]:
    """The recipe's command line from `ksg audit one-run`'s positionals, in any order: the one without '=' is the
    config, the rest are overrides.

    Raises:
        KsgConfigError: more than one config file.
    """
    items = [x for x in [args.config, *args.overrides] if x]
    configs = [x for x in items if "=" not in x]
    if len(configs) > 1:
        raise KsgConfigError("command line", [f"one config file at most, got {configs}; overrides are key=value"])
    return (["--config", configs[0]] if configs else []) + [x for x in items if "=" in x]


def run_audit(args: Any) -> int:
    """Run `ksg audit one-run`: the recipe `jobs/audit_one_run.py` with the config and overrides given."""
    import importlib

    importlib.import_module("ksg_ray.jobs.audit_one_run").main(recipe_argv(args))
    return 0
