"""`ksg eval-run RUN_DIR data.path=FILE [data.limit=N] [name=NAME] [k=v ...]`: score every method of a finished
run again, on another test set, which is what a client does with its own test split.

Each method is evaluated by the same job, decoding and metrics as the run's own evaluation (the run's
`pipeline_summary.json` keeps the evaluate stage's config and, per method, the overrides that select its model:
a folder, an adapter on the client, or the bundle). The test set is the client's: the metrics go to
`RUN_DIR/eval-NAME/<method>.json`, the predictions (which hold its text) to `RUN_DIR/client/eval-NAME/`.
No privacy audit runs here (it needs the run's own members and canaries); the run's ε per method is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ksg_ray.audit.report import ReportError

__all__ = ["add_eval_run_args", "eval_run", "format_table", "run_eval_run"]

TABLE_METRICS = ("answer_loss", "rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine", "unfinished_rate",
                 "loop_rate")
# what the run's own evaluation set that a new test set replaces (its size, its audits)
DROPPED = ("data.path=", "data.limit=", "audit.")


def eval_run(run_dir: Path, overrides: list[str]) -> tuple[str, list[dict]]:
    """Evaluate every method of `run_dir` with `overrides` (data.path=FILE required; name=NAME optional).

    Returns:
        (the results folder name, the methods' results as `read_eval_results` gives them).

    Raises:
        ReportError: no finished run there, or no data.path.
    """
    from ksg_ray.common.run_layout import RunLayout, read_eval_results
    from ksg_ray.jobs import evaluate

    run_dir = Path(run_dir).resolve()
    summary_file = RunLayout(run_dir).summary
    if not summary_file.is_file():
        raise ReportError(f"{summary_file}: not found; eval-run needs a run that `ksg pipeline` finished")
    summary = json.loads(summary_file.read_text())
    if not summary.get("methods"):
        raise ReportError(f"{summary_file} lists no evaluated methods (a run before eval-run existed, or without the "
                          "evaluate stage): run `ksg pipeline` on it again, which skips the finished stages")
    data = [o for o in overrides if o.startswith("data.path=")]
    if not data:
        raise ReportError("eval-run needs the test set: data.path=FILE (JSONL records, like the training data)")
    names = [o.removeprefix("name=") for o in overrides if o.startswith("name=")]
    name = names[-1] if names else Path(data[-1].removeprefix("data.path=")).stem
    results = f"eval-{name}"
    RunLayout(run_dir, results)  # a bad name fails before anything runs
    own = summary["evaluate"]
    base = (["--config", own["config"]] if own.get("config") else []) + \
        [o for o in own.get("overrides", []) if not o.startswith(DROPPED)]
    user = [o for o in overrides if not o.startswith("name=")]
    for method, model in summary["methods"].items():
        print(f"[eval-run] {method} on {data[-1].removeprefix('data.path=')}", flush=True)
        evaluate.main([*base, *model, f"run.dir={run_dir}", f"run.method={method}", f"run.results={results}",
                       "audit.scan_synthetic=false", *user])
    return results, read_eval_results(run_dir, results)


def format_table(results: list[dict]) -> str:
    """Methods × metrics, each value with its 95% bootstrap interval."""
    from ksg_ray.common.run_layout import epsilon_label

    def cell(r: dict, k: str) -> str:
        v, ci = r["metrics"].get(k), (r.get("metrics_ci") or {}).get(k)
        if v is None:
            return "—"
        spec = ".2f" if k == "bleu" else ".3f"
        return format(v, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else "")

    rows = [["method", "ε", "n", *TABLE_METRICS]]
    rows += [[r["method"], epsilon_label(r["epsilon"]), str(r["n"]), *(cell(r, k) for k in TABLE_METRICS)]
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def add_eval_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory that `ksg pipeline` finished")
    parser.add_argument("overrides", nargs="*",
                        help="data.path=FILE (required), data.limit=N, name=NAME (default: FILE's stem), and any "
                             "evaluation key=value")


def run_eval_run(args: argparse.Namespace) -> int:
    results, rows = eval_run(args.run_dir, args.overrides)
    print(f"\n{args.run_dir}/{results}: answer loss = mean NLL per reference answer token (lower is better); "
          "[lo, hi] = 95% bootstrap interval over the test records\n" + format_table(rows))
    return 0
