"""`ksg`: one command for every stage. Each stage is a recipe in jobs/ that also runs under `ray job submit`."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (recipe module, side of the trust boundary, what it does)
STAGES = {
    "dp-train": ("ksg_ray.jobs.dp_finetune", "client", "DP LoRA fine-tuning of the generator; writes the bundle"),
    "dp-reward": ("ksg_ray.jobs.dp_reward", "client", "DP reward model on the same records; joins the bundle"),
    "finetune": ("ksg_ray.jobs.finetune", "server", "fine-tune the target on the synthetic data; exports the model"),
    "synthesize": ("ksg_ray.jobs.synthesize", "server", "bundle -> synthetic dataset on Ray Data (filter, distil, "
                   "reward filtering, refinement)"),
    "pipeline": ("ksg_ray.jobs.pipeline", "both", "every stage in order (client stages, synthesis, fine-tune, eval, "
                 "report, serve); skips finished ones"),
    "eval": ("ksg_ray.jobs.evaluate", "auditor", "utility metrics + privacy audit of one model -> RUN/eval/M.json"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ksg", description="ksg-ray: private domain LLMs on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, side, help_text) in STAGES.items():
        p = sub.add_parser(name, help=f"[{side}] {help_text}")
        p.add_argument("config", nargs="?", default=None, help="YAML config")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
    from ksg_ray.bundle import add_bundle_args
    from ksg_ray.client.canary import add_canary_args

    add_bundle_args(sub)
    add_canary_args(sub.add_parser("canary", help="[client] inject fake-PII canaries into records for audits"))
    from ksg_ray.audit.report import add_report_args

    add_report_args(sub.add_parser("report", help="Markdown report + plots from a run directory (eval/, synth/)"))
    from ksg_ray.serve.launch import add_serve_args

    add_serve_args(sub.add_parser("serve", help="[server] OpenAI-compatible API of a model dir on Ray Serve"))
    p = sub.add_parser("models", help="provision an embedded model into the cache and print its directory")
    p.add_argument("name", nargs="?", default="smollm2-135m")

    args = parser.parse_args(argv)
    if args.command in STAGES:
        recipe = importlib.import_module(STAGES[args.command][0])
        cfg = ["--config", args.config] if args.config and "=" not in args.config else []
        overrides = ([args.config] if args.config and "=" in args.config else []) + args.overrides
        recipe.main(cfg + overrides)
        return 0
    if args.command == "bundle":
        from ksg_ray.bundle import run_bundle

        return run_bundle(args)
    if args.command == "canary":
        from ksg_ray.client.canary import run_canary

        return run_canary(args) or 0
    if args.command == "report":
        from ksg_ray.audit.report import run_report

        return run_report(args)
    if args.command == "serve":
        from ksg_ray.serve.launch import run_serve

        return run_serve(args)
    if args.command == "models":
        from ksg_ray.common.hub import resolve_model

        print(resolve_model(args.name))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
