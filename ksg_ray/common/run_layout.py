"""The run directory: one place that says where each stage writes and where the report reads.

A run directory collects what one experiment produced, so `ksg report RUN_DIR` can build the comparison from
files alone, without re-running anything:

    <run>/eval/<method>.json      one per evaluated method (`ksg eval`), keys checked by `write_eval_result`
    <run>/eval/<method>.predictions.jsonl   its answers to the held-out questions, with per-record scores
    <run>/synth/funnel.json       the synthesis funnel and reward distributions (the synthesis job)
    <run>/synth/synthetic.jsonl   the synthetic dataset (records + provenance columns)
    <run>/bundle/privacy.json     the client bundle's privacy report (`ksg_ray.bundle.read_privacy`)
    <run>/report/report.md        the report, with its PNG plots beside it (`ksg report`)

JSON has no Infinity: a non-finite ε is written as the string "inf" and read back as a float (as in the
bundle's privacy.json); a metric that could not be computed is written as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksg_ray.common.jsonl import write_json_atomic

__all__ = ["METRIC_KEYS", "PRIVACY_KEYS", "RunLayout", "decode_epsilon", "encode_epsilon", "epsilon_label",
           "read_eval_results", "read_funnel", "write_eval_result", "write_funnel"]

METRIC_KEYS = ("rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine", "judge")
PRIVACY_KEYS = ("canary_rate_synthetic", "canary_rate_generations", "mia_auc")
_METHOD_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.=@+")


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory (nothing is created until a stage writes).

    `results` names the evaluation folder: `eval` for the run's own held-out split, `eval-<name>` for a
    re-scoring of the finished run on another test set (`ksg eval-run`); the predictions go to the same name
    under `client/`.
    """

    root: Path
    results: str = "eval"

    def __init__(self, root: str | Path, results: str = "eval") -> None:
        if results != "eval" and not (results.startswith("eval-") and set(results) <= _METHOD_NAME_OK):
            raise ValueError(f"results folder {results!r} must be 'eval' or 'eval-<name>' (letters, digits, _-.=@+)")
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "results", results)

    @property
    def eval_dir(self) -> Path:
        return self.root / self.results

    def eval_file(self, method: str) -> Path:
        """`<run>/eval/<method>.json`.

        Raises:
            ValueError: `method` is empty or has characters unsafe in a file name.
        """
        if not method or not set(method) <= _METHOD_NAME_OK or method.startswith("."):
            raise ValueError(f"method name {method!r} must be non-empty, not start with '.', and use only "
                             "letters, digits and _-.=@+ (it names the file eval/<method>.json)")
        return self.eval_dir / f"{method}.json"

    def eval_predictions(self, method: str) -> Path:
        """`<run>/client/eval/<method>.predictions.jsonl`: per held-out record, the question, the reference, the
        answer and its scores. They hold the held-out records' text, so they stay on the client's side."""
        return self.client_dir / self.results / self.eval_file(method).with_suffix(".predictions.jsonl").name

    def fidelity_plot(self, method: str) -> Path:
        """`<run>/eval/<method>.fidelity.png`: real vs synthetic embeddings in 2-D (points, no text)."""
        return self.eval_file(method).with_suffix(".fidelity.png")

    @property
    def synth_dir(self) -> Path:
        return self.root / "synth"

    @property
    def funnel(self) -> Path:
        return self.synth_dir / "funnel.json"

    @property
    def synthetic(self) -> Path:
        return self.synth_dir / "synthetic.jsonl"

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    @property
    def privacy(self) -> Path:
        return self.bundle_dir / "privacy.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.md"

    # `ksg pipeline` plays both sides in one run directory: `client/` stands for the client's machine.
    @property
    def client_dir(self) -> Path:
        return self.root / "client"

    @property
    def private_records(self) -> Path:
        """CLIENT SIDE: the training records (with canaries, if planted)."""
        return self.client_dir / "private.jsonl"

    @property
    def held_out(self) -> Path:
        """CLIENT SIDE: the held-out records, never trained on (evaluation and non-members)."""
        return self.client_dir / "held_out.jsonl"

    @property
    def secrets(self) -> Path:
        """CLIENT SIDE: the planted canaries' secrets (the audit key)."""
        return self.client_dir / "secrets.json"

    @property
    def client_dp_dir(self) -> Path:
        """CLIENT SIDE: the DP jobs' runs and the records' privacy ledger."""
        return self.client_dir / "dp"

    def client_baseline_dir(self, name: str) -> Path:
        """CLIENT SIDE: a baseline trained on the private records at another ε, with its own ledger and bundle."""
        return self.client_dir / name

    @property
    def finetune_dir(self) -> Path:
        return self.root / "finetune"

    def variant_dir(self, name: str) -> Path:
        """A synthesis baseline's own `synth/` and `finetune/`."""
        return self.root / "variants" / name

    def synth_dir_of(self, method: str) -> Path:
        """The synthesis output a method was trained on (the pipeline's own, or a baseline variant's)."""
        return self.synth_dir if method == "pipeline" else self.variant_dir(method) / "synth"

    @property
    def summary(self) -> Path:
        return self.root / "pipeline_summary.json"


def encode_epsilon(epsilon: float | str | None) -> float | str | None:
    """ε as JSON can hold it: a finite float, "inf", or None (the method used no private data)."""
    if epsilon is None:
        return None
    eps = decode_epsilon(epsilon)
    return "inf" if math.isinf(eps) else eps


def epsilon_label(epsilon: float | None) -> str:
    """ε for people: 8.0 → "8", 10.5676 → "10.57", inf → "∞", None → "—" (the method used no private data)."""
    if epsilon is None:
        return "—"
    return "∞" if math.isinf(epsilon) else f"{epsilon:.4g}"


def decode_epsilon(epsilon: Any) -> float | None:
    """ε from JSON or a config: a float >= 0, "inf" read as float('inf'), None kept.

    Raises:
        ValueError: not a number >= 0, "inf" or None.
    """
    if epsilon is None:
        return None
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        eps = math.nan
    if isinstance(epsilon, bool) or not eps >= 0:
        raise ValueError(f"epsilon must be a number >= 0, \"inf\" or null, got {epsilon!r}")
    return eps


def write_eval_result(path: str | Path, result: dict) -> Path:
    """Write one method's evaluation (`ksg eval`'s output), after checking its keys.

    Args:
        path: normally `RunLayout(run).eval_file(method)`.
        result: {"method", "epsilon", "metrics": {METRIC_KEYS}, "privacy": {PRIVACY_KEYS}, "model", "n", ...};
            missing values as None or NaN.

    Raises:
        ValueError: a required key is missing or ε is invalid.
    """
    _check_eval_result(result, str(path))
    return write_json_atomic(path, {**result, "epsilon": encode_epsilon(result["epsilon"])})


def _check_eval_result(result: Any, where: str) -> None:
    problems = []
    if not isinstance(result, dict):
        raise ValueError(f"{where}: an evaluation result must be a JSON object, got {type(result).__name__}")
    problems += [f"missing key {k!r}" for k in ("method", "epsilon", "metrics", "privacy", "model", "n")
                 if k not in result]
    for section, keys in (("metrics", METRIC_KEYS), ("privacy", PRIVACY_KEYS)):
        value = result.get(section)
        if section in result and not isinstance(value, dict):
            problems.append(f"{section!r} must be an object")
        elif isinstance(value, dict):
            problems += [f"{section}.{k}: missing (write null when not computed)" for k in keys if k not in value]
            problems += [f"{section}.{k}: must be a number or null, got {value[k]!r}" for k in keys
                         if k in value and value[k] is not None and not _is_number(value[k])]
    try:
        decode_epsilon(result.get("epsilon"))
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError(f"{where}: invalid evaluation result: " + "; ".join(problems))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_eval_results(run_dir: str | Path, folder: str = "eval") -> list[dict]:
    """Every `<run>/<folder>/*.json` (`RunLayout.results`: eval, or eval-<name>), ε decoded to a float (or None),
    metrics None where missing; sorted by (ε, method) with no-ε methods first.

    Raises:
        ValueError: a file is not valid JSON or lacks required keys (the file is named).
    """
    results = []
    for path in sorted(RunLayout(run_dir, folder).eval_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        _check_eval_result(data, str(path))
        data["epsilon"] = decode_epsilon(data["epsilon"])
        results.append(data)
    return sorted(results, key=lambda r: (r["epsilon"] is not None, r["epsilon"] or 0.0, r["method"]))


def write_funnel(path: str | Path, funnel: list[tuple[str, int]], rewards: dict[str, list[float]]) -> Path:
    """Write `synth/funnel.json`: stages in order with the rows left after each, and reward samples.

    Args:
        path: normally `RunLayout(run).funnel`.
        funnel: [(stage name, rows left), ...] in pipeline order.
        rewards: {"candidates": rewards before filtering, "kept": rewards of the kept rows}.

    Raises:
        ValueError: malformed funnel or rewards.
    """
    data = {"funnel": [[str(name), int(count)] for name, count in funnel],
            "rewards": {k: [float(x) for x in rewards.get(k, [])] for k in ("candidates", "kept")}}
    _check_funnel(data, str(path))
    return write_json_atomic(path, data)


def read_funnel(path: str | Path) -> dict:
    """`synth/funnel.json` as {"funnel": [(name, count), ...], "rewards": {"candidates": [...], "kept": [...]}}.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, or malformed (the problem is named).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    _check_funnel(data, str(path))
    rewards = data.get("rewards") or {}
    return {"funnel": [(name, int(count)) for name, count in data["funnel"]],
            "rewards": {k: [float(x) for x in rewards.get(k) or [] if x is not None] for k in ("candidates", "kept")}}


def _check_funnel(data: Any, where: str) -> None:
    problems = []
    funnel = data.get("funnel") if isinstance(data, dict) else None
    if not isinstance(funnel, list) or not funnel:
        problems.append("'funnel' must be a non-empty list of [stage name, count]")
    else:
        for i, item in enumerate(funnel):
            if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
                problems.append(f"funnel[{i}] must be [stage name, count >= 0], got {str(item)[:60]}")
    rewards = data.get("rewards", {}) if isinstance(data, dict) else {}
    if not isinstance(rewards, dict):
        problems.append("'rewards' must be an object with 'candidates' and 'kept' lists")
    else:
        for k, v in rewards.items():
            if not isinstance(v, list) or not all(x is None or _is_number(x) for x in v):
                problems.append(f"rewards.{k} must be a list of numbers")
    if problems:
        raise ValueError(f"{where}: invalid funnel file: " + "; ".join(problems))
