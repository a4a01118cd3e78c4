"""`ksg pipeline`'s runner: every stage in order, each the same recipe as its own command, wired by the run layout.

A stage whose verified output exists is skipped, so a rerun after a failure picks up where it stopped. The
private records are passed to the client stages only (`<run>/client/` plays the client's machine); every server
stage gets the bundle and public inputs. The evaluation stage runs where the auditor may read the held-out split
and the members (`<run>/client/`), as `ksg eval` does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ksg_ray.common.run_layout import RunLayout, encode_epsilon
from ksg_ray.pipeline.config import SYNTH_VARIANTS, PipelineConfig, StageSection

__all__ = ["PipelineRunner", "split_client_data"]


def stage_args(stage: StageSection, *wiring: str) -> list[str]:
    """The stage's own config and overrides, then the pipeline's wiring (which wins)."""
    return (["--config", str(stage.config)] if stage.config else []) + list(stage.overrides) + list(wiring)


def split_client_data(cfg: PipelineConfig, layout: RunLayout) -> tuple[Path, Path]:
    """CLIENT SIDE — training records (with canaries if asked) and the held-out split, as files in `client/`.

    The held-out split is the last `held_out` records: the guarantee is then stated for the training records
    (a record added to them is a neighbouring dataset; the split itself is fixed before any DP step).
    """
    from ksg_ray.client.canary import inject_canaries, write_secrets
    from ksg_ray.common.records import DataError, load_records, write_jsonl

    records = load_records(cfg.data, limit=cfg.data_limit)
    if len(records) <= cfg.held_out:
        raise DataError(f"{cfg.data}: {len(records)} records, but held_out={cfg.held_out}: nothing left to train on")
    train, held_out = records[:-cfg.held_out], records[-cfg.held_out:]
    if cfg.canaries.fraction > 0:
        train, secrets = inject_canaries(train, cfg.canaries.fraction, cfg.canaries.seed, cfg.canaries.field)
        write_secrets(secrets, layout.secrets)
    write_jsonl(train, layout.private_records)
    write_jsonl(held_out, layout.held_out)
    return layout.private_records, layout.held_out


def has_component(bundle: Path, name: str) -> bool:
    from ksg_ray.bundle import BundleError, verify_bundle

    try:
        return name in verify_bundle(bundle)["components"]
    except BundleError:
        return False


def synthetic_rows(path: Path, max_round: int) -> int:
    """Rows of a synthesis output with round <= `max_round` (0 when the file is missing)."""
    if not path.is_file():
        return 0
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return sum(1 for row in rows if row.get("round", 0) <= max_round)


class PipelineRunner:
    """Runs the stages of one `PipelineConfig` in one run directory and times each one."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir.resolve())  # absolute: Ray workers do not run in this directory
        self.times: dict[str, float | str] = {}
        self.models: dict[str, Path | None] = {}
        self.evaluated: dict[str, list[str]] = {}  # method -> the evaluation overrides that select its model

    def stage(self, name: str, fn: Callable[..., object], *args: object, done: bool = False, **kwargs: object) -> None:
        if done:
            self.times[name] = "skipped (output exists)"
            print(f"[pipeline] {name}: skipped, its output exists", flush=True)
            return
        ran = sum(1 for t in self.times.values() if not isinstance(t, str))
        print(f"[pipeline] {name} ... (stage {ran + 1}; {self.elapsed():.0f} s so far)", flush=True)
        started = time.perf_counter()
        fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - started, 1)
        print(f"[pipeline] {name}: {self.times[name]} s", flush=True)

    def build_first_model(self) -> None:
        """Provision the first client stage's model (an embedded one is built into the cache on a first run), so
        that its build can run beside Ray's start; the stage then finds it built."""
        from ksg_ray.client.config import DPFinetuneConfig, DPRewardConfig  # the configs alone: the jobs' imports
        from ksg_ray.common.config import job_config  # (torch, Opacus) would take Ray's start to themselves
        from ksg_ray.common.hub import resolve_model

        for name, stage, config in (("dp_train", self.cfg.dp_train, DPFinetuneConfig),
                                    ("dp_reward", self.cfg.dp_reward, DPRewardConfig)):
            if name in self.cfg.stages:
                resolve_model(job_config(config, stage_args(stage), name).model.name)
                return

    def elapsed(self) -> float:
        return sum(t for t in self.times.values() if not isinstance(t, str))

    def run(self) -> dict[str, Any]:
        from ksg_ray.common.cpu_blas import describe

        cfg, layout = self.cfg, self.layout
        print(f"[pipeline] {describe()}", flush=True)
        self.private, self.held_out = split_client_data(cfg, layout)
        self.client_stages()
        self.models["pipeline"] = self.distill(layout.synth_dir, layout.finetune_dir, cfg.rounds, [])
        for name in (b for b in cfg.baselines if b in SYNTH_VARIANTS):  # the papers' synthesis baselines
            rounds = cfg.rounds if name == "rewardds" else 0  # the others have no refinement
            # the same questions as the pipeline where the variant samples them the same way
            share = [f"queries.share_from={layout.synth_dir}"]
            self.models[name] = self.distill(layout.variant_dir(name) / "synth", layout.variant_dir(name) / "finetune",
                                             rounds, [*SYNTH_VARIANTS[name], *share], label=f" [{name}]")
        if "evaluate" in cfg.stages:
            self.evaluate_methods()
            self.write_model_cards()
        if "report" in cfg.stages:
            from ksg_ray.audit.report import build_report

            not_run = {k.removeprefix("evaluate "): v for k, v in self.times.items()
                       if k.startswith("evaluate ") and isinstance(v, str) and v.startswith("NOT RUN")}
            self.stage("report", build_report, layout.root, epsilon_grid=self.report_grid(), not_evaluated=not_run)
        model_dir = self.models["pipeline"]
        if "serve" in cfg.stages or cfg.serve.enabled:
            if model_dir is None:
                raise ValueError("serve needs the finetune stage's model (add finetune to `stages`)")
            self.stage("serve", deploy, model_dir, cfg.serve.host, cfg.serve.port)
        summary = {"run_dir": str(layout.root), "stage_seconds": self.times,
                   "model_dir": str(model_dir) if model_dir else None,
                   # what `ksg eval-run` needs to score every method again on another test set
                   "methods": self.evaluated, "evaluate": {
                       "config": str(cfg.evaluate.config.resolve()) if cfg.evaluate.config else None,
                       "overrides": list(cfg.evaluate.overrides)}}
        layout.summary.write_text(json.dumps(summary, indent=2))
        return summary

    def client_stages(self) -> None:
        """CLIENT SIDE: the DP generator and the DP reward model, on the private records, into the bundle."""
        from ksg_ray.jobs import dp_finetune, dp_reward

        cfg, bundle = self.cfg, self.layout.bundle_dir
        wiring = [f"data.path={self.private}", f"run.output_dir={self.layout.client_dp_dir}"]
        if "dp_train" in cfg.stages:
            self.stage("dp_train", dp_finetune.main, stage_args(cfg.dp_train, *wiring, f"run.bundle_dir={bundle}"),
                       done=has_component(bundle, "generator"))
        if "dp_reward" in cfg.stages:
            self.stage("dp_reward", dp_reward.main,
                       stage_args(cfg.dp_reward, *wiring, f"candidates.generator_bundle={bundle}"),
                       done=has_component(bundle, "reward"))

    def distill(self, synth_dir: Path, finetune_dir: Path, rounds: int, variant: list[str],
                label: str = "") -> Path | None:
        """SERVER SIDE: synthesis + fine-tune rounds; round 0: reward-guided filtering, r >= 1: refinement with
        the target as rewriter.

        A baseline variant whose synthesis wrote no row is not trained (None), and the summary says why; the
        pipeline's own synthesis writing nothing is an error (`ksg finetune` names the empty file).
        """
        from ksg_ray.jobs import finetune, synthesize

        cfg, model_dir = self.cfg, None
        for r in range(rounds + 1):
            rewriter = [f"refine.rewriter={model_dir}"] if model_dir else []
            if "synthesize" in cfg.stages:
                self.stage(f"synthesize{label} round {r}", synthesize.main, stage_args(
                    cfg.synthesize, *variant, f"bundle={self.layout.bundle_dir}", f"run.output_dir={synth_dir}",
                    f"refine.rounds={r}", *rewriter))
            if label and "finetune" in cfg.stages and synthetic_rows(synth_dir / "synthetic.jsonl", r) == 0:
                self.times[f"finetune{label} round {r}"] = "NOT RUN: its synthesis wrote no row (baseline not trained)"
                print(f"[pipeline] finetune{label} round {r}: NOT RUN, {synth_dir / 'synthetic.jsonl'} has no row "
                      f"of round <= {r}; this baseline is not evaluated", flush=True)
                return None
            if "finetune" in cfg.stages:
                out = finetune_dir / f"round{r}"
                init = [f"init.from={model_dir}"] if model_dir else []
                if model_dir and cfg.refine_epochs:
                    init.append(f"train.epochs={cfg.refine_epochs}")
                self.stage(f"finetune{label} round {r}", finetune.main, stage_args(
                    cfg.finetune, f"data.path={synth_dir / 'synthetic.jsonl'}", f"data.max_round={r}",
                    f"run.output_dir={finetune_dir}", f"run.name=round{r}", *init),  # dev: the config's public split
                    done=(out / "model" / "model_ref.json").is_file())  # written last, by the export
                model_dir = out / "model"
        return model_dir

    def evaluate_methods(self) -> None:
        """Every method on the held-out split, with the privacy audit (members, canaries, synthetic scan).

        The evaluations run in this process one after the other (`engine.ray: false`) and share their engines
        (`shared_engines`): the judge, and the base model it may be, load once, not once per method."""
        from ksg_ray.engines import shared_engines

        with shared_engines():
            self._evaluate_methods()

    def _evaluate_methods(self) -> None:
        from ksg_ray.jobs import evaluate

        cfg, layout = self.cfg, self.layout
        methods = [(m, None) for m in cfg.baselines] + [(f"dp_finetune@{e:g}", e) for e in cfg.epsilon_grid]
        for method, grid_epsilon in methods:
            if method in SYNTH_VARIANTS and self.models.get(method) is None and "finetune" in cfg.stages:
                self.times[f"evaluate {method}"] = "NOT RUN: its synthesis wrote no row, so no model was trained"
                continue
            model = self.evaluated[method] = self.method_model(method, grid_epsilon)
            audit = [f"audit.secrets={layout.secrets}", f"audit.canary_records={self.private}"] \
                if cfg.canaries.fraction > 0 else [f"audit.members={self.private}"]
            if method in SYNTH_VARIANTS or method == "pipeline":  # trained on a synthetic set: scan it too
                synthetic = [f"audit.synthetic={layout.synth_dir_of(method) / 'synthetic.jsonl'}",
                             f"audit.bundle={layout.bundle_dir}"]
            else:  # the privacy report is the model's own bundle's (base: the run's, for reference)
                synthetic = ["audit.scan_synthetic=false"]
            self.stage(f"evaluate {method}", evaluate.main, stage_args(
                cfg.evaluate, *model, f"data.path={self.held_out}", f"audit.nonmembers={self.held_out}",
                f"run.dir={layout.root}", f"run.method={method}", *audit, *synthetic),
                done=layout.eval_file(method).is_file())

    def write_model_cards(self) -> None:
        """A `README.md` model card in each evaluated model's folder (server exports; the client's evaluation-only
        adapters, on the client). The bundle's generator is not touched: the bundle is checksummed as shipped."""
        from ksg_ray.audit.model_card import write_model_card
        from ksg_ray.bundle import read_privacy
        from ksg_ray.common.run_layout import decode_epsilon

        privacy = read_privacy(self.layout.bundle_dir) if self.layout.privacy.is_file() else None
        for method, overrides in self.evaluated.items():
            given = dict(o.split("=", 1) for o in overrides if o.startswith(("model.name=", "model.adapter=")))
            folder = Path(given.get("model.adapter") or given.get("model.name", ""))
            result_file = self.layout.eval_file(method)
            if not (folder.is_absolute() and folder.is_dir()) or not result_file.is_file():
                continue  # a hub model (base), a bundle, or not evaluated
            ref = folder / "model_ref.json"
            base = json.loads(ref.read_text())["base_model"] if ref.is_file() else given["model.name"]
            result = json.loads(result_file.read_text())
            result["epsilon"] = decode_epsilon(result.get("epsilon"))
            write_model_card(folder, method=method, result=result, privacy=privacy, base_model=base)

    def method_model(self, method: str, grid_epsilon: float | None = None) -> list[str]:
        """Overrides that select the model of one evaluated method (training a client-side baseline if needed)."""
        from ksg_ray.bundle import read_privacy
        from ksg_ray.common.config import load_config
        from ksg_ray.server.finetune.config import FinetuneConfig

        cfg, bundle = self.cfg, self.layout.bundle_dir
        if method == "base":  # the distilled model's own starting point
            base = load_config(FinetuneConfig, cfg.finetune.config, list(cfg.finetune.overrides)).model.name
            return [f"model.name={base}", "run.epsilon=0"]  # never trained on the private records
        if method == "dp_finetune" and cfg.dp_finetune == "generator":
            return [f"model.bundle={bundle}", "run.family=dp_finetune"]
        if method in ("non_private", "dp_finetune") or grid_epsilon is not None:
            return self.client_baseline(method, grid_epsilon)
        if self.models.get(method) is None:
            raise ValueError(f"baseline {method!r} needs the synthesize and finetune stages (add them to `stages`)")
        # trained only on DP outputs: its ε is the bundle's composed ε (post-processing)
        return [f"model.name={self.models[method]}", f"run.epsilon={encode_epsilon(read_privacy(bundle)['epsilon'])}"]

    def client_baseline(self, method: str, grid_epsilon: float | None) -> list[str]:
        """CLIENT SIDE: the same DP code as an evaluation-only run (`privacy.publish=false`): the client's ledger
        records it as unpublished, so it counts toward no bundle's ε, and its adapter stays on the client (no
        bundle). non_private (ε = ∞) learns the answers alone, like every other fine-tune; so do dp_finetune (at the
        generator's ε) and the ε grid's points (dp_finetune@ε, its line in the privacy-utility plot) unless
        `dp_finetune: generator` makes them DP generators like the bundle's (also trained on the questions)."""
        from ksg_ray.client.config import DPFinetuneConfig
        from ksg_ray.common.config import load_config
        from ksg_ray.jobs import dp_finetune

        generator = load_config(DPFinetuneConfig, self.cfg.dp_train.config, list(self.cfg.dp_train.overrides))
        epsilon = {"non_private": math.inf, "dp_finetune": generator.privacy.target_epsilon}.get(method, grid_epsilon)
        folder = method if grid_epsilon is None else f"dp_eps{grid_epsilon:g}"
        answer_only = method == "non_private" or self.cfg.dp_finetune == "answer_only"
        out = self.layout.client_baseline_dir(folder)
        adapter = out / "generator" / "adapter"
        self.stage(f"{method} fine-tune (baseline)", dp_finetune.main, stage_args(
            self.cfg.dp_train, f"data.path={self.private}", f"run.output_dir={out}", "run.name=generator",
            "privacy.publish=false", f"privacy.target_epsilon={encode_epsilon(epsilon)}",
            *(["data.question_loss=false"] if answer_only else [])),
            done=(adapter / "adapter_model.safetensors").is_file())
        family = [] if method == "non_private" else ["run.family=dp_finetune"]
        return [f"model.name={generator.model.name}", f"model.adapter={adapter}",
                f"run.epsilon={encode_epsilon(epsilon)}", *family]

    def report_grid(self) -> list[float] | None:
        """The report's ε axis: the configured grid plus every ε the run has (None without a grid: every ε found)."""
        if not self.cfg.epsilon_grid:
            return None
        from ksg_ray.bundle import read_privacy

        return sorted({*self.cfg.epsilon_grid, read_privacy(self.layout.bundle_dir)["epsilon"], 0.0, math.inf})


def deploy(model_dir: Path, host: str, port: int, model_id: str = "ksg-distilled") -> str:
    """Deploy the distilled model on Ray Serve (OpenAI-compatible) and leave it running; returns the base URL."""
    from ray import serve

    from ksg_ray.serve.app import build_app
    from ksg_ray.serve.config import parse_app_config
    from ksg_ray.serve.launch import start_serve

    app_config = parse_app_config({"models": {model_id: str(Path(model_dir).resolve())}})
    app_config.check_model_dirs()
    start_serve(host, port)
    serve.run(build_app(app_config), name="ksg", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}/v1"
    print(f"[pipeline] serving {model_id!r} at {url} (OpenAI-compatible)", flush=True)
    return url


def format_times(times: dict[str, float | str]) -> str:
    """Each stage's wall time, one line each, and the total."""
    width = max([len(k) for k in times] + [5])
    lines = ["pipeline stage wall times"]
    lines += [f"  {name:<{width}}  {t if isinstance(t, str) else f'{t:8.1f} s'}" for name, t in times.items()]
    total = sum(t for t in times.values() if not isinstance(t, str))
    return "\n".join(lines + [f"  {'total':<{width}}  {total:8.1f} s"])
