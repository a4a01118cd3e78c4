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


def split_positionals(parser: argparse.ArgumentParser, items: list[str | None]) -> tuple[str | None, list[str]]:
    """A stage's positionals in any order: the one without '=' is the YAML config, the rest are overrides."""
    configs = [x for x in items if x and "=" not in x]
    if len(configs) > 1:
        parser.error(f"one config file at most, got {configs}; overrides are key=value")
    return (configs[0] if configs else None), [x for x in items if x and "=" in x]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `ksg` parser and each command's own parser (which parses its options and overrides in any order)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("ksg-ray")
    except PackageNotFoundError:  # run from a checkout that is not installed
        release = "unknown"
    parser = argparse.ArgumentParser(prog="ksg", description="ksg-ray: private domain LLMs on Ray")
    parser.add_argument("--version", action="version", version=f"ksg-ray {release}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, side, help_text) in STAGES.items():
        p = sub.add_parser(name, help=f"[{side}] {help_text}", description=help_text,
                           epilog=f"Every config key, its default and its description: ksg config show {name} "
                                  "[CONFIG] [key=value ...]")
        p.add_argument("config", nargs="?", default=None, help="YAML config")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
    from ksg_ray.common.config import add_config_args

    add_config_args(sub.add_parser("config", help="print a stage's resolved config with every default"),
                    list(STAGES))
    from ksg_ray.bundle import add_bundle_args
    from ksg_ray.client.canary import add_canary_args

    add_bundle_args(sub)
    add_canary_args(sub.add_parser("canary", help="[client] inject fake-PII canaries into records for audits"))
    from ksg_ray.client.privacy.ledger import add_privacy_args

    add_privacy_args(sub.add_parser("privacy", help="[client] every DP run on these records, composed ε, budget"))
    from ksg_ray.audit.report import add_report_args

    add_report_args(sub.add_parser("report", help="Markdown report + plots from a run directory (eval/, synth/)"))
    from ksg_ray.serve.launch import add_serve_args

    add_serve_args(sub.add_parser("serve", help="[server] OpenAI-compatible API of a model dir on Ray Serve"))
    p = sub.add_parser("models", help="provision an embedded model into the cache and print its directory")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:  # options and key=value overrides in any order (intermixed parsing)
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    if args.command in STAGES:
        recipe = importlib.import_module(STAGES[args.command][0])
        config, overrides = split_positionals(parser, [args.config, *args.overrides])
        recipe.main((["--config", config] if config else []) + overrides)
        return 0
    if args.command == "bundle":
        from ksg_ray.bundle import run_bundle

        return run_bundle(args)
    if args.command == "canary":
        from ksg_ray.client.canary import run_canary

        return run_canary(args) or 0
    if args.command == "privacy":
        from ksg_ray.client.privacy.ledger import run_privacy

        return run_privacy(args)
    if args.command == "report":
        from ksg_ray.audit.report import run_report

        return run_report(args)
    if args.command == "serve":
        from ksg_ray.serve.launch import run_serve

        return run_serve(args)
    if args.command == "config":
        from ksg_ray.common.config import run_config_show

        args.config, args.overrides = split_positionals(parser, [args.config, *args.overrides])
        return run_config_show(args, {name: module for name, (module, _, _) in STAGES.items()})
    if args.command == "models":
        from ksg_ray.common.hub import resolve_model

        print(resolve_model(args.name))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
