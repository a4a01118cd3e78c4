"""`ksg`: one command for every stage. Each stage is a recipe in jobs/ that also runs under `ray job submit`.

`main` is the one error boundary: an error in what the user gave (a config, a data file, a bundle, the ledger or
budget, too few rows: a `KsgError`; or a missing file) prints one `ksg: error: MESSAGE` line and exits 2, like a
usage error; anything else is a bug and keeps its traceback (exit 1). `KSG_DEBUG=1` shows every traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from ksg_ray.common.errors import KsgError

USER_ERRORS = (KsgError, FileNotFoundError)
USER_ERROR_STATUS = 2  # argparse's status for a usage error

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
    from ksg_ray.pipeline.eval_run import add_eval_run_args

    add_eval_run_args(sub.add_parser("eval-run", help="[auditor] every method of a finished run on another test set "
                                     "-> RUN/eval-NAME/M.json, and the methods x metrics table"))
    from ksg_ray.audit.one_run import add_audit_args

    add_audit_args(sub)
    from ksg_ray.serve.launch import add_serve_args

    add_serve_args(sub.add_parser("serve", help="[server] OpenAI-compatible API of a model dir on Ray Serve"))
    p = sub.add_parser("models", help="provision an embedded model into the cache and print its directory")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    return parser, dict(sub.choices)


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    """The group of subcommands under `parser` (`ksg`'s commands, `ksg bundle`'s), or None."""
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def command_path(parser: argparse.ArgumentParser,
                 argv: list[str]) -> tuple[list[tuple[str, str]], argparse.ArgumentParser]:
    """The subcommands that start `argv`, each as (dest, name) (`ksg bundle verify` has two), and the parser of
    the last one (`parser` itself when there is none)."""
    chosen: list[tuple[str, str]] = []
    leaf = parser
    while len(chosen) < len(argv) and (group := subcommands(leaf)) is not None and argv[len(chosen)] in group.choices:
        chosen.append((group.dest, argv[len(chosen)]))
        leaf = group.choices[argv[len(chosen) - 1]]
    return chosen, leaf


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a `ksg` command line; a command's options and key=value overrides come in any order.

    The command's own parser, below any group (`ksg bundle verify`), parses the rest of the line intermixed.
    A group cannot (argparse refuses intermixed parsing with subcommands), so `ksg --version`, `ksg bundle
    --help` and a line that stops at a group go through the plain parser.
    """
    parser, _ = build_parser()
    chosen, leaf = command_path(parser, argv)
    if not chosen or subcommands(leaf) is not None:
        return parser.parse_args(argv)
    args = leaf.parse_intermixed_args(argv[len(chosen):])
    for dest, name in chosen:
        setattr(args, dest, name)
    if args.command in STAGES or args.command == "config":
        args.config, args.overrides = split_positionals(leaf, [args.config, *args.overrides])
    return args


def error_message(error: BaseException) -> str:
    """The `ksg: error:` text of a user error (a missing file says which)."""
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return f"{error.filename}: file not found"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Run `ksg`; returns the exit status (2 and one `ksg: error:` line for a user error)."""
    if argv is None:  # the real command line (not a test calling main): MKL at full speed on AMD CPUs
        from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

        reexec_with_mkl_intel_path()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(parse_args(argv))
    except USER_ERRORS as e:
        if os.environ.get("KSG_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        cause = getattr(e, "cause", None)  # a Ray task's error that is also the job's own: show the job's message
        print(f"ksg: error: {error_message(cause if isinstance(cause, USER_ERRORS) else e)}", file=sys.stderr)
        return USER_ERROR_STATUS


def run(args: argparse.Namespace) -> int:
    """Run a parsed `ksg` command; returns the exit status."""
    if args.command in STAGES:
        recipe = importlib.import_module(STAGES[args.command][0])
        recipe.main((["--config", args.config] if args.config else []) + args.overrides)
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
    if args.command == "eval-run":
        from ksg_ray.pipeline.eval_run import run_eval_run

        return run_eval_run(args)
    if args.command == "audit":
        from ksg_ray.audit.one_run import run_audit

        return run_audit(args)
    if args.command == "serve":
        from ksg_ray.serve.launch import run_serve

        return run_serve(args)
    if args.command == "config":
        from ksg_ray.common.config import run_config_show

        return run_config_show(args, {name: module for name, (module, _, _) in STAGES.items()})
    if args.command == "models":
        from ksg_ray.common.hub import resolve_model

        print(resolve_model(args.name))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
