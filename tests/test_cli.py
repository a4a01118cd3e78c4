"""`ksg`: options and key=value overrides in any order, `--version`, every config key shown with its default, `--help`
on every command (`ksg bundle verify` too), and one `ksg: error:` line (exit 2, no traceback) for a user error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ksg_ray import cli
from ksg_ray.common.config import job_config
from ksg_ray.server.synth.config import SynthConfig


def test_serve_takes_overrides_after_its_options(smollm2_path):
    from ksg_ray.serve.launch import app_config_from_args

    _, commands = cli.build_parser()
    args = commands["serve"].parse_intermixed_args(
        ["smollm2-135m", "--host", "127.0.0.1", "--port", "8001", "auth.token_env=KSG_TOKEN", "--name", "m"])
    assert (args.model_dir, args.host, args.port, args.name) == ("smollm2-135m", "127.0.0.1", 8001, "m")
    assert args.overrides == ["auth.token_env=KSG_TOKEN"]
    assert app_config_from_args(args).auth.token_env == "KSG_TOKEN"


def test_a_stage_takes_its_config_and_overrides_in_any_order(capsys):
    assert cli.main(["config", "show", "synthesize", "queries.per_prompt=3", "configs/synthesize.yaml",
                     "seed=7"]) == 0
    shown = capsys.readouterr().out
    assert "per_prompt: 3" in shown and "seed: 7" in shown
    assert "mode: sample" in shown  # from the YAML, not the class default
    assert "# PUBLIC server-side sampling seed" in shown  # every key with its description
    cfg = job_config(SynthConfig, ["queries.per_prompt=3", "--config", "configs/synthesize.yaml", "seed=7"], "t")
    assert (cfg.queries.per_prompt, cfg.seed, cfg.queries.mode) == (3, 7, "sample")
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "synthesize", "a.yaml", "b.yaml"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("ksg-ray ")


REPO = Path(__file__).parents[1]


def ksg(*args, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`ksg ARGS` in a fresh interpreter (as a user runs it), without KSG_DEBUG unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "KSG_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ksg_ray.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=base | (env or {}), timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("ksg: error:")]


def test_every_subcommand_answers_help(capsys):
    """`--help` on every command and on every group (`ksg bundle`) and its commands (`ksg bundle verify`)."""
    parser, _ = cli.build_parser()
    paths, todo = [], [([], parser)]
    while todo:
        path, p = todo.pop()
        paths.append(path)
        group = cli.subcommands(p)
        todo += [([*path, name], child) for name, child in (group.choices.items() if group else [])]
    assert ["bundle", "verify"] in paths and ["models"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            cli.main([*path, "--help"])
        assert e.value.code == 0, path
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(['ksg', *path])} "), path


def test_bundle_verify_through_the_cli(client_bundle, tmp_path):
    """`ksg bundle verify DIR`: 0 for the client's bundle, 1 and the problem for a tampered one, 2 for none."""
    bundle = tmp_path / "bundle"
    shutil.copytree(client_bundle[0] / "bundle", bundle)
    done = ksg("bundle", "verify", bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK {bundle}: components=generator,reward, epsilon=")
    assert ksg("bundle", "--help").returncode == 0
    (bundle / "notes.txt").write_text("hi")
    done = ksg("bundle", "verify", bundle)
    assert done.returncode == 1 and "notes.txt: not allowed" in done.stderr and "Traceback" not in done.stderr
    missing = tmp_path / "nope"
    done = ksg("bundle", "verify", missing)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert error_lines(done) == [f"ksg: error: invalid bundle {missing}: {missing}: not a directory"]


BAD_INPUTS = {  # what a user gets wrong -> (ksg arguments; {tmp} is a fresh folder, what the error must name)
    "missing config": (["dp-train", "{tmp}/dp.yaml"], "{tmp}/dp.yaml: file not found"),
    "bad value": (["dp-train", "configs/dp_finetune.yaml", "train.epochs=abc"], "train.epochs: "),
    "misspelt key": (["dp-train", "configs/dp_finetune.yaml", "train.epocs=2"], "train.epocs: "),
    "missing ledger": (["privacy", "show", "{tmp}/client"], "{tmp}/client/privacy_ledger.json: no privacy ledger"),
    "missing bundle": (["dp-reward", "configs/dp_reward.yaml", "model.name=tiny-random", "privacy.delta=1e-3",
                        "run.output_dir={tmp}/runs", "candidates.generator_bundle={tmp}/bundle"],
                       "invalid bundle {tmp}/bundle: "),
    "missing data": (["dp-train", "configs/dp_finetune.yaml", "model.name=tiny-random", "run.output_dir={tmp}/runs",
                      "data.path={tmp}/train.jsonl"], "{tmp}/train.jsonl: file not found"),
    "bad epsilon grid": (["report", "{tmp}", "--epsilon-grid", "1,x"], "--epsilon-grid '1,x': expected"),
    "unreachable epsilon": (["dp-train", "configs/dp_finetune.yaml", "model.name=tiny-random", "privacy.delta=1e-3",
                             "run.output_dir={tmp}/runs", "privacy.target_epsilon=1e-9"], "cannot reach ε=1e-09"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_user_error_is_one_line_exit_2_and_no_traceback(case, tmp_path):
    args, needle = BAD_INPUTS[case]
    done = ksg(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and needle.format(tmp=tmp_path) in lines[0], done.stderr


def test_ksg_debug_shows_the_traceback(tmp_path):
    done = ksg("privacy", "show", tmp_path, env={"KSG_DEBUG": "1"})
    assert done.returncode == 2 and "Traceback" in done.stderr and len(error_lines(done)) == 1


def test_an_unexpected_error_keeps_its_traceback_and_exits_1():
    code = ("import sys\nfrom ksg_ray import cli\n\ndef run(args):\n    raise RuntimeError('a bug')\n\n"
            "cli.run = run\nsys.exit(cli.main(['models']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr
    assert not error_lines(done)


def test_every_project_error_is_a_user_error():
    from ksg_ray.bundle import BundleError
    from ksg_ray.client.privacy.ledger import LedgerError
    from ksg_ray.common.config import KsgConfigError
    from ksg_ray.common.records import DataError
    from ksg_ray.server.synth.pipeline import TooFewRows

    for error in (BundleError, LedgerError, KsgConfigError, DataError, TooFewRows):
        assert issubclass(error, cli.USER_ERRORS), error
