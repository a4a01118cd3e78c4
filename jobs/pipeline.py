"""Every stage in order: DP generator, DP reward, synthesis + fine-tune rounds, evaluation, report, serve.

    ksg pipeline configs/pipeline.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline.yaml

Each stage is the same recipe as its own command, called with the paths that connect it to the others; a
stage whose verified output exists is skipped, so a rerun after a failure picks up where it stopped. The
private records are passed to the two client stages only (`run_dir/client/` plays the client's machine);
every server stage gets the bundle and public inputs. Wall time per stage is printed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ksg_ray.common.config import job_config
from ksg_ray.pipeline.config import SYNTH_VARIANTS, PipelineConfig, StageSection

logger = logging.getLogger("ksg.pipeline")


def _args(stage: StageSection, *wiring: str) -> list[str]:
    """The stage's own config and overrides, then the pipeline's wiring (which wins)."""
    return (["--config", str(stage.config)] if stage.config else []) + list(stage.overrides) + list(wiring)


def split_client_data(cfg: PipelineConfig, client: Path) -> tuple[Path, Path]:
    """CLIENT SIDE — training records (with canaries if asked) and the held-out split, as files in `client/`."""
    from ksg_ray.client.canary import inject_canaries, write_secrets
    from ksg_ray.common.records import DataError, load_records, write_jsonl

    records = load_records(cfg.data)
    if len(records) <= cfg.held_out:
        raise DataError(f"{cfg.data}: {len(records)} records, but held_out={cfg.held_out}: nothing left to train on")
    train, held_out = records[:-cfg.held_out], records[-cfg.held_out:]
    if cfg.canaries.fraction > 0:
        train, secrets = inject_canaries(train, cfg.canaries.fraction, cfg.canaries.seed, cfg.canaries.field)
        write_secrets(secrets, client / "secrets.json")
    client.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, client / "private.jsonl")
    write_jsonl(held_out, client / "held_out.jsonl")
    return client / "private.jsonl", client / "held_out.jsonl"


def _has_component(bundle: Path, name: str) -> bool:
    from ksg_ray.bundle import BundleError, verify_bundle

    try:
        return name in verify_bundle(bundle)["components"]
    except BundleError:
        return False


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(PipelineConfig, argv, __doc__.split("\n")[0])

    import ray

    from ksg_ray.jobs import dp_finetune, dp_reward, evaluate, finetune, synthesize

    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    run = cfg.run_dir.resolve()  # absolute: Ray workers do not run in this directory
    client = run / "client"
    bundle, synth_dir = run / "bundle", run / "synth"
    times: dict[str, float | str] = {}

    def stage(name: str, fn: Callable[..., object], *args: object, done: bool = False, **kwargs: object) -> None:
        if done:
            times[name] = "skipped (output exists)"
            print(f"[pipeline] {name}: skipped, its output exists", flush=True)
            return
        print(f"[pipeline] {name} ...", flush=True)
        started = time.perf_counter()
        fn(*args, **kwargs)
        times[name] = round(time.perf_counter() - started, 1)
        print(f"[pipeline] {name}: {times[name]} s", flush=True)

    private, held_out = split_client_data(cfg, client)
    client_wiring = [f"data.path={private}", f"run.output_dir={client / 'dp'}"]
    if "dp_train" in cfg.stages:
        stage("dp_train", dp_finetune.main, _args(cfg.dp_train, *client_wiring, f"run.bundle_dir={bundle}"),
              done=_has_component(bundle, "generator"))
    if "dp_reward" in cfg.stages:
        reward_wiring = [*client_wiring, f"candidates.generator_bundle={bundle}"]
        stage("dp_reward", dp_reward.main, _args(cfg.dp_reward, *reward_wiring), done=_has_component(bundle, "reward"))

    def distill(synth_dir: Path, finetune_dir: Path, rounds: int, variant: list[str], label: str = "") -> Path | None:
        """Synthesis + fine-tune rounds; round 0: reward-guided filtering, r >= 1: refinement with the target.

        A baseline variant whose synthesis wrote no row is not trained (None), and the summary says why; the
        pipeline's own synthesis writing nothing is an error (`ksg finetune` names the empty file).
        """
        model_dir = None
        for r in range(rounds + 1):
            rewriter = [f"refine.rewriter={model_dir}"] if model_dir else []
            if "synthesize" in cfg.stages:
                stage(f"synthesize{label} round {r}", synthesize.main, _args(
                    cfg.synthesize, *variant, f"bundle={bundle}", f"run.output_dir={synth_dir}", f"refine.rounds={r}",
                    *rewriter))
            if label and "finetune" in cfg.stages and _rows(synth_dir / "synthetic.jsonl", r) == 0:
                times[f"finetune{label} round {r}"] = "NOT RUN: its synthesis wrote no row (baseline not trained)"
                print(f"[pipeline] finetune{label} round {r}: NOT RUN, {synth_dir / 'synthetic.jsonl'} has no row "
                      f"of round <= {r}; this baseline is not evaluated", flush=True)
                return None
            if "finetune" in cfg.stages:
                out = finetune_dir / f"round{r}"
                init = [f"init.from={model_dir}"] if model_dir else []
                if model_dir and cfg.refine_epochs:
                    init.append(f"train.epochs={cfg.refine_epochs}")
                stage(f"finetune{label} round {r}", finetune.main, _args(
                    cfg.finetune, f"data.path={synth_dir / 'synthetic.jsonl'}", f"data.max_round={r}",
                    f"run.output_dir={finetune_dir}", f"run.name=round{r}", *init),  # dev: the config's public split
                    done=(out / "model" / "model_ref.json").is_file())  # written last, by the export
                model_dir = out / "model"
        return model_dir

    model_dir = distill(synth_dir, run / "finetune", cfg.rounds, [])
    models: dict[str, Path | None] = {"pipeline": model_dir}
    for name in (b for b in cfg.baselines if b in SYNTH_VARIANTS):  # the papers' synthesis baselines
        variant = SYNTH_VARIANTS[name]
        rounds = cfg.rounds if name == "rewardds" else 0  # the others have no refinement
        models[name] = distill(run / "variants" / name / "synth", run / "variants" / name / "finetune", rounds,
                               variant, label=f" [{name}]")

    if "evaluate" in cfg.stages:
        methods = [(m, None) for m in cfg.baselines] + [(f"dp_finetune@{e:g}", e) for e in cfg.epsilon_grid]
        for method, grid_epsilon in methods:
            if method in SYNTH_VARIANTS and models.get(method) is None and "finetune" in cfg.stages:
                times[f"evaluate {method}"] = "NOT RUN: its synthesis wrote no row, so no model was trained"
                continue
            model = _method_model(cfg, method, client, bundle, models, private, stage, grid_epsilon)
            audit = [f"audit.secrets={client / 'secrets.json'}", f"audit.canary_records={private}"] \
                if cfg.canaries.fraction > 0 else [f"audit.members={private}"]
            if method in SYNTH_VARIANTS or method == "pipeline":  # trained on a synthetic set: scan it too
                variant_dir = synth_dir if method == "pipeline" else run / "variants" / method / "synth"
                synthetic = [f"audit.synthetic={variant_dir / 'synthetic.jsonl'}", f"audit.bundle={bundle}"]
            else:  # the privacy report is the model's own bundle's (base: the run's, for reference)
                synthetic = ["audit.scan_synthetic=false"]
            stage(f"evaluate {method}", evaluate.main, _args(
                cfg.evaluate, *model, f"data.path={held_out}", f"audit.nonmembers={held_out}",
                f"run.dir={run}", f"run.method={method}", *audit, *synthetic),
                done=(run / "eval" / f"{method}.json").is_file())
    if "report" in cfg.stages:
        from ksg_ray.audit.report import build_report

        not_run = {k.removeprefix("evaluate "): v for k, v in times.items()
                   if k.startswith("evaluate ") and isinstance(v, str) and v.startswith("NOT RUN")}
        stage("report", build_report, run, epsilon_grid=_report_grid(cfg, bundle), not_evaluated=not_run)
    if "serve" in cfg.stages or cfg.serve.enabled:
        if model_dir is None:
            raise ValueError("serve needs the finetune stage's model (add finetune to `stages`)")
        stage("serve", deploy, model_dir, cfg.serve.host, cfg.serve.port)

    summary = {"run_dir": str(run), "stage_seconds": times, "model_dir": str(model_dir) if model_dir else None}
    (run / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(k) for k in times) if times else 0
    print("\npipeline stage wall times")
    for name, t in times.items():
        print(f"  {name:<{width}}  {t if isinstance(t, str) else f'{t:8.1f} s'}")
    total = sum(t for t in times.values() if not isinstance(t, str))
    print(f"  {'total':<{width}}  {total:8.1f} s\n")
    return summary


def deploy(model_dir: Path, host: str, port: int, model_id: str = "ksg-distilled") -> str:
    """Deploy the distilled model on Ray Serve (OpenAI-compatible) and leave it running; returns the base URL."""
    from ray import serve

    from ksg_ray.serve.app import build_app
    from ksg_ray.serve.config import parse_app_config

    app_config = parse_app_config({"models": {model_id: str(Path(model_dir).resolve())}})
    app_config.check_model_dirs()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_config), name="ksg", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}/v1"
    print(f"[pipeline] serving {model_id!r} at {url} (OpenAI-compatible)", flush=True)
    return url


def _method_model(cfg: PipelineConfig, method: str, client: Path, bundle: Path, models: dict[str, Path | None],
                  private: Path, stage: Callable, grid_epsilon: float | None = None) -> list[str]:
    """Overrides that select the model of one evaluated method (training a client-side baseline if needed)."""
    from ksg_ray.bundle import read_privacy
    from ksg_ray.common.config import load_config
    from ksg_ray.common.run_layout import encode_epsilon
    from ksg_ray.server.finetune.config import FinetuneConfig

    if method == "base":  # the distilled model's own starting point
        base = load_config(FinetuneConfig, cfg.finetune.config, list(cfg.finetune.overrides)).model.name
        return [f"model.name={base}", "run.epsilon=0"]  # never trained on the private records
    if method == "dp_finetune":
        return [f"model.bundle={bundle}", "run.family=dp_finetune"]
    if method == "non_private" or grid_epsilon is not None:
        # CLIENT SIDE: the same DP code at another ε (inf = non-private), in its own ledger and bundle: it must
        # not touch the real run's ε. Grid points join dp_finetune's line in the privacy-utility plot.
        from ksg_ray.jobs import dp_finetune

        epsilon = math.inf if grid_epsilon is None else grid_epsilon
        out = client / ("non_private" if grid_epsilon is None else f"dp_eps{grid_epsilon:g}")
        stage(f"{method} fine-tune (baseline)", dp_finetune.main, _args(
            cfg.dp_train, f"data.path={private}", f"run.output_dir={out}", f"run.bundle_dir={out / 'bundle'}",
            f"privacy.target_epsilon={encode_epsilon(epsilon)}"),
            done=_has_component(out / "bundle", "generator"))
        family = [] if grid_epsilon is None else ["run.family=dp_finetune"]
        return [f"model.bundle={out / 'bundle'}", f"run.epsilon={encode_epsilon(epsilon)}", *family]
    if models.get(method) is None:
        raise ValueError(f"baseline {method!r} needs the synthesize and finetune stages (add them to `stages`)")
    # trained only on DP outputs: its ε is the bundle's composed ε (post-processing)
    return [f"model.name={models[method]}", f"run.epsilon={encode_epsilon(read_privacy(bundle)['epsilon'])}"]


def _rows(path: Path, max_round: int) -> int:
    """Rows of a synthesis output with round <= `max_round` (0 when the file is missing)."""
    if not path.is_file():
        return 0
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return sum(1 for row in rows if row.get("round", 0) <= max_round)


def _report_grid(cfg: PipelineConfig, bundle: Path) -> list[float] | None:
    """The report's ε axis: the configured grid plus every ε the run has (None without a grid: every ε found)."""
    if not cfg.epsilon_grid:
        return None
    from ksg_ray.bundle import read_privacy

    return sorted({*cfg.epsilon_grid, read_privacy(bundle)["epsilon"], 0.0, math.inf})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(sys.argv[1:])
