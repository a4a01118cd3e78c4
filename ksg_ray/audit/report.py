"""`ksg report RUN_DIR`: one Markdown report with PNG plots, built from a run directory's files alone.

Reads what the stages wrote (`ksg_ray.common.run_layout`): every method's evaluation, the synthesis funnel and reward
distributions, and the bundle's privacy report. Writes `<run>/report/report.md` and beside it:

    privacy_utility.png   utility (and the two privacy attacks) against ε, one line per method family
    rewards.png           reward histograms of the candidates before and of the rows kept after filtering
    funnel.png            rows left after each synthesis stage

An input that is missing is named in the report and its plot is left out; nothing is invented to fill a gap.
Plots use matplotlib's object API (`Figure`, no pyplot state), so building a report in a server process
or a thread is safe.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksg_ray.common.errors import KsgError
from ksg_ray.common.run_layout import (
    METRIC_KEYS,
    RunLayout,
    decode_epsilon,
    epsilon_label,
    read_eval_results,
    read_funnel,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "add_report_args", "build_report", "parse_grid", "plot_funnel", "plot_privacy_utility",
           "plot_rewards", "privacy_utility_figure", "run_report"]

logger = logging.getLogger(__name__)

PLOTS = {"privacy_utility": "privacy_utility.png", "rewards": "rewards.png", "funnel": "funnel.png"}
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU",
                 "embedding_cosine": "MiniLM cos", "judge": "judge (1-10)",
                 "canary_rate_synthetic": "canary rate (synthetic)", "canary_rate_generations": "canary rate (gen.)",
                 "mia_auc": "MIA AUC", "answer_loss": "answer loss", "unfinished_rate": "unfinished",
                 "loop_rate": "loops"}
EXTRA_METRICS = ("answer_loss", "unfinished_rate", "loop_rate")  # newer results carry them



class ReportError(KsgError, ValueError):
    """A report option the user must fix (an unparseable --epsilon-grid)."""

def build_report(run_dir: str | Path, *, epsilon_grid: Sequence[float] | None = None, utility_metric: str = "rougeL",
                 out_dir: str | Path | None = None, not_evaluated: dict[str, str] | None = None) -> Path:
    """Write the report of a run directory and return the Markdown file's path.

    Args:
        run_dir: the run directory (`ksg_ray.common.run_layout.RunLayout`).
        epsilon_grid: the ε values of the privacy–utility plot's x axis (inf allowed); None = every ε found.
            Grid points without a result, and results off the grid, are listed in the report.
        utility_metric: the metric on the plot's utility axis (one of `run_layout.METRIC_KEYS`).
        out_dir: where to write (None = `<run>/report`).
        not_evaluated: method -> why it has no result (listed under the table, so a missing row is explained).

    Returns:
        The path of `report.md`.

    Raises:
        ValueError: unknown `utility_metric`, a negative grid value, or a malformed input file (named).
    """
    if utility_metric not in METRIC_KEYS:
        raise ValueError(f"utility_metric {utility_metric!r} is not one of {METRIC_KEYS}")
    if epsilon_grid is not None and any(not e >= 0 for e in epsilon_grid):
        raise ValueError(f"epsilon grid values must be >= 0 (inf allowed), got {list(epsilon_grid)}")
    layout = RunLayout(run_dir)
    out = Path(out_dir) if out_dir is not None else layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    results = read_eval_results(run_dir) if layout.eval_dir.is_dir() else []
    funnel = read_funnel(layout.funnel) if layout.funnel.is_file() else None
    privacy = _read_bundle_privacy(layout)

    md = [f"# ksg-ray report: `{layout.root}`", "",
          f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} from the files of the run directory.", ""]
    md += _methods_section(results, layout)
    if not_evaluated:
        md += ["Not evaluated:", "", *(f"- `{m}`: {why}" for m, why in not_evaluated.items()), ""]
    md += _privacy_section(privacy, layout)
    md += _audit_section(layout)
    md += ["## Privacy–utility", ""]
    if results:
        grid, notes = _grid(results, epsilon_grid)
        if any(r["epsilon"] in grid for r in results):
            plot_privacy_utility(results, grid, utility_metric, out / PLOTS["privacy_utility"])
            md += [f"![privacy-utility]({PLOTS['privacy_utility']})", "", *notes,
                   "Methods without ε (no private data used) are drawn as dotted horizontal reference lines.", ""]
        else:
            md += ["No method has an ε on the grid: nothing to plot.", "", *notes]
    else:
        md += [f"No evaluation results: `{layout.eval_dir}/*.json` missing (run `ksg eval`).", ""]
    md += _synthesis_section(funnel, layout, out)
    report = out / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    logger.info("report: wrote %s", report)
    return report


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _with_ci(x: Any, ci: list[float] | None, spec: str) -> str:
    return _fmt(x, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci and x is not None else "")


def _methods_section(results: list[dict], layout: RunLayout) -> list[str]:
    md = ["## Methods", ""]
    if not results:
        return md + [f"No evaluation results in `{layout.eval_dir}`.", ""]
    keys = [*METRIC_KEYS, *(k for k in EXTRA_METRICS if any(k in r["metrics"] for r in results))]
    head = ["method", "ε", "n", *(METRIC_LABELS[k] for k in keys), "judge parsed",
            *(METRIC_LABELS[k] for k in ("canary_rate_synthetic", "canary_rate_generations", "mia_auc"))]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m, p, ci = r["metrics"], r["privacy"], r.get("metrics_ci") or {}
        judge = (r.get("counts") or {}).get("judge") or {}
        parsed = f"{judge['parsed']}/{judge['parsed'] + judge['unparsed'] + judge['failed']}" if judge else "—"
        cells = [f"`{r['method']}`", epsilon_label(r["epsilon"]), str(r["n"]),
                 *(_with_ci(m.get(k), ci.get(k), ".2f" if k in ("bleu", "judge") else ".3f") for k in keys), parsed,
                 *(_fmt(p.get(k)) for k in ("canary_rate_synthetic", "canary_rate_generations", "mia_auc"))]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "ROUGE: F1 in [0, 1]; BLEU: corpus BLEU in [0, 100]; MiniLM cos: mean cosine of answer and reference; "
           "judge: the professional model's mean 1–10 grade over the replies it could be parsed from (parsed / "
           "graded). Canary rates: share of planted secrets found in the synthetic data / in answers to targeted "
           "prompts. MIA AUC: loss-based membership inference (0.5 = no signal). answer loss: mean negative "
           "log-likelihood per token of the held-out reference answers (lower is better). unfinished: share of "
           "greedy answers cut at the budget before their end of turn; loops: share with a repeated word 6-gram. "
           "[lo, hi]: 95% bootstrap interval over the held-out records. — = not computed.", ""]
    return md + _fidelity_section(results, layout)


def _fidelity_section(results: list[dict], layout: RunLayout) -> list[str]:
    """The synthetic sets' fidelity (measured on the audit side, against the client's records) and the plots."""
    rows = [(r["method"], r["fidelity"]) for r in results if (r.get("fidelity") or {}).get("rows")]
    if not rows:
        return []
    md = ["## Synthetic data: fidelity and copying", "",
          "| method | rows | nearest-real share | MAUVE | copy share (questions, answers) | answers with a loop | "
          "other language |", "|---|---|---|---|---|---|---|"]
    for method, f in rows:
        share = f"{f['nearest_real_share']:.2f} (cos ≥ {f['nearest_real_threshold']:.3f})"
        copies = f"{f['copy_share']:.3f} ({f['copy_share_questions']:.3f}, {f['copy_share_answers']:.3f})"
        md.append(f"| `{method}` | {f['rows']} | {share} | {_fmt(f['mauve'])} | {copies} | "
                  f"{_fmt(f.get('loop_share'))} | {_fmt(f.get('other_language_share'))} |")
    md += ["", "Nearest-real share: synthetic questions whose MiniLM cosine to their nearest training question "
           "reaches the 5th percentile of the held-out questions' (their minimum below 20). MAUVE: synthetic vs "
           "held-out question+answer texts on MiniLM features (1 = indistinguishable). Copy share: rows whose "
           "question or answer near-copies a training record (cosine ≥ 0.95, or a 16-word run found in that record "
           "alone).", ""]
    for method, _ in rows:
        plot = layout.fidelity_plot(method)
        if plot.is_file():
            md += [f"![{method}: real vs synthetic](../eval/{plot.name})", ""]
    return md


def _audit_section(layout: RunLayout) -> list[str]:
    """The one-run audits (`ksg audit one-run` with run.output_dir inside the run): the ε lower bound beside the
    claimed ε."""
    import json

    audits = []
    for path in sorted(layout.root.rglob("audit/*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "epsilon_lower_bound" in result:
            audits.append((path, result))
    if not audits:
        return []
    md = ["## One-run privacy audit (Steinke, Nasr & Jagielski 2023)", "",
          "| audit | trained on | claimed ε | ε lower bound | correct / guesses | m | confidence | highest possible |",
          "|---|---|---|---|---|---|---|---|"]
    for path, r in audits:
        claimed = epsilon_label(decode_epsilon(r["claimed_epsilon"]))
        md.append(f"| `{path.relative_to(layout.root)}` | {r['trained_on']} | {claimed} | "
                  f"{r['epsilon_lower_bound']:.3f} | {r['correct']} / {r['guesses']} | {r['canaries']} | "
                  f"{r['confidence']:.0%} | {r['max_possible_bound']:.3f} |")
    return md + ["", "A lower bound above the claimed ε would mean the DP training leaks more than it claims. "
                 "With m canaries the bound cannot exceed the last column, so a bound of 0 at ε = 8 only rules out "
                 "gross bugs.", ""]


def _read_bundle_privacy(layout: RunLayout) -> dict | None:
    if not layout.privacy.is_file():
        return None
    from ksg_ray.bundle import read_privacy

    return read_privacy(layout.bundle_dir)


def _privacy_section(privacy: dict | None, layout: RunLayout) -> list[str]:
    md = ["## The bundle's privacy report", ""]
    if privacy is None:
        return md + [f"`{layout.privacy}` missing: no bundle in this run directory.", ""]
    eps, not_dp = privacy.get("epsilon"), privacy.get("not_dp") or []
    if not_dp:
        md += [f"**WARNING: not DP.** The private data was used outside DP: {'; '.join(map(str, not_dp))}.", ""]
    if isinstance(eps, float) and math.isinf(eps):
        md += ["**WARNING: ε = ∞** — the bundle was trained without DP (the non-private baseline).", ""]
    md += ["| key | value |", "|---|---|"]
    for key, value in privacy.items():
        if key == "mechanisms":
            for m in value or []:
                md.append(f"| mechanism `{m.get('name', '?')}` | σ={_fmt(m.get('noise_multiplier'), '.4f')}, "
                          f"q={_fmt(m.get('sample_rate'), '.4f')}, steps={m.get('steps')} |")
        elif isinstance(value, float):
            md.append(f"| {key} | {epsilon_label(value) if key.startswith('epsilon') else format(value, '.3g')} |")
        else:
            md.append(f"| {key} | {str(value).replace('|', '/') if value not in ([], '') else '(none)'} |")
    return md + [""]


def _grid(results: list[dict], epsilon_grid: Sequence[float] | None) -> tuple[list[float], list[str]]:
    found = sorted({r["epsilon"] for r in results if r["epsilon"] is not None})
    if epsilon_grid is None:
        return found, []
    grid = sorted(set(float(e) for e in epsilon_grid))
    notes = []
    missing = [e for e in grid if e not in found]
    if missing:
        notes.append("- No result at ε = " + ", ".join(epsilon_label(e) for e in missing) + " (grid points not run).")
    off = [r["method"] for r in results if r["epsilon"] is not None and r["epsilon"] not in grid]
    if off:
        notes.append("- Off the ε grid, not plotted: " + ", ".join(f"`{m}`" for m in off) + ".")
    return grid, [*notes, ""] if notes else []


def plot_privacy_utility(results: list[dict], grid: Sequence[float], utility_metric: str, path: Path) -> Path:
    """Save `privacy_utility_figure` as a PNG."""
    privacy_utility_figure(results, grid, utility_metric).savefig(path, dpi=110)
    return path


def privacy_utility_figure(results: list[dict], grid: Sequence[float], utility_metric: str) -> Figure:
    """Panels over the ε grid (evenly spaced, ∞ last): the held-out answer loss (the primary metric, when the
    results have it), the utility metric, and MIA AUC / canary rates.

    Utility points carry their 95% bootstrap intervals as error bars (a method without ε: a dotted line in a
    shaded band), so a difference inside the intervals does not look like a result. Methods of one `family`
    (default: the method) are joined by a line.
    """
    from matplotlib.figure import Figure

    utility = ["answer_loss"] if any(r["metrics"].get("answer_loss") is not None for r in results) else []
    utility += [utility_metric] if utility_metric not in utility else []
    fig = Figure(figsize=(5.5 * (len(utility) + 1), 4.2), layout="constrained")
    *ax_us, ax_p = fig.subplots(1, len(utility) + 1)
    x_of = {e: i for i, e in enumerate(grid)}
    families: dict[str, list[dict]] = {}
    for r in results:
        families.setdefault(r.get("family") or r["method"], []).append(r)
    colors = [f"C{i % 10}" for i in range(len(families))]
    step = min(0.08, 0.6 / max(len(families), 1))  # methods at the same ε side by side, not on top of each other
    for i, (color, (family, rows)) in enumerate(zip(colors, families.items(), strict=True)):
        on_grid = sorted((r for r in rows if r["epsilon"] in x_of), key=lambda r: r["epsilon"])
        dodge = (i - (len(families) - 1) / 2) * step
        for ax, key in zip(ax_us, utility, strict=True):
            _utility_points(ax, family, color, on_grid, [r for r in rows if r["epsilon"] is None], key, x_of, dodge)
        for key, style in (("mia_auc", "-o"), ("canary_rate_generations", "--s")):
            label = f"{family}: {METRIC_LABELS[key]}"
            pts = [(x_of[r["epsilon"]], r["privacy"][key]) for r in on_grid if r["privacy"].get(key) is not None]
            if pts:
                ax_p.plot(*zip(*pts, strict=True), style, color=color, label=label)
            for r in rows:
                if r["epsilon"] is None and r["privacy"].get(key) is not None:
                    ax_p.axhline(r["privacy"][key], color=color, linestyle=":", label=f"{label} (no ε)")
    titles = [f"{METRIC_LABELS[k]} (95% intervals)" for k in utility]
    for ax, title in ((*zip(ax_us, titles, strict=True), (ax_p, "privacy attacks"))):
        ax.set_xticks(range(len(grid)), [epsilon_label(e) for e in grid])
        ax.set_xlim(-0.5, max(len(grid) - 0.5, 0.5))
        ax.set_xlabel("ε (δ fixed; ∞ = no DP)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = ax_us[0].get_legend_handles_labels() if ax_us else ([], [])
    if handles:  # one legend for the utility panels, below them: inside, it hides points
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    if ax_p.get_legend_handles_labels()[0]:
        ax_p.legend(fontsize=7)
    ax_p.axhline(0.5, color="grey", linewidth=0.8)
    ax_p.set_ylim(-0.02, 1.02)
    ax_p.set_ylabel("MIA AUC (0.5 = chance) / canary rate")
    for ax, key in zip(ax_us, utility, strict=True):
        ax.set_ylabel(METRIC_LABELS[key] + (" (lower is better)" if key == "answer_loss" else ""))
    return fig


def _utility_points(ax: Any, family: str, color: str, on_grid: list[dict], no_epsilon: list[dict], key: str,
                    x_of: dict[float, int], dodge: float = 0.0) -> None:
    """One family's `key` on one panel: points on the grid (shifted by `dodge`) with interval error bars, joined by
    a line; a method without ε as a dotted line in a band spanning its interval."""
    pts = [(x_of[r["epsilon"]] + dodge, r["metrics"][key], (r.get("metrics_ci") or {}).get(key))
           for r in on_grid if r["metrics"].get(key) is not None]
    if pts:
        xs, ys, cis = zip(*pts, strict=True)
        yerr = [[y - ci[0] if ci else 0 for y, ci in zip(ys, cis, strict=True)],
                [ci[1] - y if ci else 0 for y, ci in zip(ys, cis, strict=True)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="-o", color=color, capsize=4, label=family)
    for r in no_epsilon:
        y, ci = r["metrics"].get(key), (r.get("metrics_ci") or {}).get(key)
        if y is not None:
            ax.axhline(y, color=color, linestyle=":", label=f"{family} (no ε)")
            if ci:
                ax.axhspan(ci[0], ci[1], color=color, alpha=0.12)


def plot_rewards(candidates: Sequence[float], kept: Sequence[float], path: Path) -> Path:
    """Overlaid histograms (same bins) of the candidates' rewards and of the kept rows' rewards."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    values = [*candidates, *kept]
    bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 4))) if values else 10
    if candidates:
        ax.hist(candidates, bins=bins, alpha=0.55, label=f"candidates before filtering (n={len(candidates)})")
    if kept:
        ax.hist(kept, bins=bins, alpha=0.75, label=f"kept after filtering (n={len(kept)})")
    ax.set_xlabel("reward (DP reward model)")
    ax.set_ylabel("rows")
    ax.set_title("Rewards before / after filtering")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_funnel(funnel: Sequence[tuple[str, int]], path: Path) -> Path:
    """Horizontal bars, first stage on top: rows after each stage, with the ratio to the stage before (stages
    may expand, e.g. n samples per prompt, as well as filter)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.45 * len(funnel) + 1.2), layout="constrained")
    ax = fig.subplots()
    names, counts = [n for n, _ in funnel], [c for _, c in funnel]
    y = list(range(len(funnel)))[::-1]
    ax.barh(y, counts, color="C0")
    ax.set_yticks(y, [n if len(n) <= 60 else n[:57] + "..." for n in names], fontsize=8)
    top = max(counts) if counts and max(counts) > 0 else 1
    for k, (yi, c) in enumerate(zip(y, counts, strict=True)):
        ratio = f" (×{c / counts[k - 1]:.2f})" if k and counts[k - 1] else ""
        ax.text(c + top * 0.01, yi, f"{c}{ratio}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.2)
    ax.set_xlabel("rows")
    ax.set_title("Synthesis funnel")
    fig.savefig(path, dpi=110)
    return path


def _synthesis_section(funnel: dict | None, layout: RunLayout, out: Path) -> list[str]:
    md = ["## Synthesis", ""]
    if funnel is None:
        return md + [f"`{layout.funnel}` missing: no synthesis in this run directory.", ""]
    rewards = funnel["rewards"]
    md += ["### Rewards before / after filtering", ""]
    if rewards["candidates"] or rewards["kept"]:
        plot_rewards(rewards["candidates"], rewards["kept"], out / PLOTS["rewards"])
        md += [f"![rewards]({PLOTS['rewards']})", ""]
        for name, xs in (("candidates", rewards["candidates"]), ("kept", rewards["kept"])):
            if xs:
                md.append(f"- {name}: n={len(xs)}, mean={sum(xs) / len(xs):.3f}, min={min(xs):.3f}, "
                          f"max={max(xs):.3f}")
        md.append("")
    else:
        md += [f"No rewards recorded in `{layout.funnel}`.", ""]
    md += ["### Funnel", "", f"![funnel]({PLOTS['funnel']})", "", "| stage | rows | × previous stage |",
           "|---|---|---|"]
    plot_funnel(funnel["funnel"], out / PLOTS["funnel"])
    previous = None
    for name, count in funnel["funnel"]:
        ratio = f"{count / previous:.3f}" if previous else "—"
        md.append(f"| {name.replace('|', '/')} | {count} | {ratio} |")
        previous = count
    return md + [""]


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ksg report RUN_DIR [--epsilon-grid 1,4,8,inf] [--metric rougeL] [--out DIR]`."""
    parser.add_argument("run_dir", type=Path, help="run directory (eval/, synth/, bundle/)")
    parser.add_argument("--epsilon-grid", default=None,
                        help="comma-separated ε values of the privacy-utility x axis, e.g. 1,4,8,inf "
                             "(default: every ε found)")
    parser.add_argument("--metric", default="rougeL", choices=METRIC_KEYS, help="utility metric to plot against ε")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")


def parse_grid(text: str | None) -> list[float] | None:
    """"1,4,8,inf" → [1.0, 4.0, 8.0, inf].

    Raises:
        ValueError: a value is not a number or "inf".
    """
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ReportError(f"--epsilon-grid {text!r}: expected comma-separated numbers or inf, e.g. 1,4,8,inf") from e


def run_report(args: argparse.Namespace) -> int:
    """Build the report; prints its path, returns the exit code (1 when the run directory does not exist)."""
    if not Path(args.run_dir).is_dir():
        print(f"{args.run_dir}: not a directory", file=sys.stderr)
        return 1
    report = build_report(args.run_dir, epsilon_grid=parse_grid(args.epsilon_grid), utility_metric=args.metric,
                          out_dir=args.out)
    print(report)
    return 0
