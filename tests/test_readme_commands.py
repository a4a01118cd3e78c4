"""The README's command lines, run against the code: a README that shows a command the CLI does not accept fails.

Every `ksg …` line of the README (its code blocks, `&&` chains included, and its inline code) is parsed by `ksg`'s
own parser and its command answers `--help`. Inline code that is only a command's name (`ksg bundle verify`) gets
`--help` alone; anything longer is a command line, with its placeholders (`DIR`, `[--budget ε]`) filled in from
PLACEHOLDERS. A stage's line has its config and overrides validated (`ksg config show`); the cheap commands
(`bundle verify`, `privacy show`, `config show`, `report`, `models`) really run, as a user types them, in a folder
laid out as the README assumes (`configs/`, `runs/bundle` from the shared test client, …). Every `ray job submit …
-- python jobs/X.py …` line: the job's script answers `--help`, its config and overrides validate, and `ray job
submit` takes the options shown.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ksg_ray import cli

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
# What a placeholder in an inline synopsis stands for when it is run (an unknown one fails the test: add it here).
PLACEHOLDERS = {"DIR": "runs/bundle", "RUN_DIR": "runs/exp", "LEDGER_DIR": "runs/client", "IN": "demo",
                "OUT": "runs/canaries.jsonl", "STAGE": "synthesize", "CONFIG": "configs/synthesize.yaml",
                "key=value": "seed=7", "ε": "40"}
CHEAP = {"bundle verify": "OK runs/bundle: components=generator,reward", "privacy show": "composed",
         "config show": "seed: 7", "report": "runs/exp/report/report.md", "models": "/"}  # -> what it prints


def readme_lines(text: str) -> list[tuple[str, bool]]:
    """Each `ksg …` and `ray job submit …` line of `text`, and whether it is inline code (a synopsis or a name)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found = [(line, False) for block in blocks for line in block.splitlines()]
    found += [(" ".join(span.split()), True) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose)]
    lines = []
    for line, inline in found:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["ksg"] or words[:3] == ["ray", "job", "submit"]:
                lines.append((shlex.join(words), inline))
    return list(dict.fromkeys(lines))


def fill(words: list[str], line: str) -> list[str]:
    """A synopsis' words with its placeholders filled in and its brackets and `...` dropped."""
    out = []
    for word in (w.strip("[]") for w in words):
        if word in ("", "..."):
            continue
        assert word in PLACEHOLDERS or not re.fullmatch(r"[A-Z][A-Z_]*", word), \
            f"README line {line!r}: placeholder {word} has no value in PLACEHOLDERS"
        out.append(PLACEHOLDERS.get(word, word))
    return out


LINES = readme_lines(README.read_text())
KSG = [(line, inline) for line, inline in LINES if line.startswith("ksg")]
JOBS = [line for line, _ in LINES if line.startswith("ray job submit") and " -- " in line]


def ksg_argv(line: str, inline: bool) -> tuple[list[str], list[str], bool]:
    """(the subcommands, the argv, whether the line only names the command: inline code of nothing but the words
    that pick what runs, such as `ksg bundle verify` or `ksg privacy show`)."""
    argv = fill(shlex.split(line)[1:], line) if inline else shlex.split(line)[1:]
    names, leaf = cli.command_path(cli.build_parser()[0], argv)
    n = len(names)
    for action in (a for a in leaf._actions if not a.option_strings):  # `show` in `ksg privacy show`
        if n == len(argv) or not action.choices or argv[n] not in action.choices:
            break
        n += 1
    return [name for _, name in names], argv, inline and n == len(argv)


def cheap(argv: list[str]) -> str | None:
    return next((c for c in CHEAP if argv[:len(c.split())] == c.split()), None)


def test_the_readme_shows_the_commands_this_test_checks():
    shown = {" ".join(ksg_argv(line, inline)[1][:2]) for line, inline in KSG}
    assert {"dp-train configs/dp_finetune.yaml", "dp-reward configs/dp_reward.yaml", "bundle verify",
            "synthesize configs/synthesize.yaml", "pipeline configs/pipeline.yaml", "eval configs/evaluate.yaml",
            "serve runs/finetune/round0/model", "privacy show", "config show"} <= shown
    assert len(JOBS) >= 5 and all(" -- python jobs/" in line for line in JOBS)


@pytest.mark.parametrize("line,inline", KSG, ids=[line for line, _ in KSG])
def test_a_readme_ksg_line_is_accepted(line, inline, capsys, monkeypatch):
    """Its command answers --help; the line parses; a stage's config and overrides validate."""
    monkeypatch.chdir(REPO)
    path, argv, name_only = ksg_argv(line, inline)
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0, f"`ksg {' '.join(path)} --help` failed:\n{capsys.readouterr().err}"
    if name_only:
        return
    try:
        args = cli.parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and argv == ["--version"]:
            return
        pytest.fail(f"README line {line!r}: ksg does not accept it (exit {e.code}):\n{capsys.readouterr().err}")
    if args.command in cli.STAGES:  # its config and every override are real keys with valid values
        shown = cli.main(["config", "show", args.command, *([args.config] if args.config else []), *args.overrides])
        assert shown == 0, f"README line {line!r}: {capsys.readouterr().err}"


@pytest.fixture(scope="module")
def readme_dir(client_bundle, tmp_path_factory):
    """A folder laid out as the README's cheap commands expect: configs/, runs/bundle (the shared test client's),
    runs/client (its ledger) and runs/exp (a run with one evaluation)."""
    from ksg_ray.common.run_layout import METRIC_KEYS, PRIVACY_KEYS, RunLayout, write_eval_result

    client, _, _ = client_bundle
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(REPO / "configs")
    shutil.copytree(client / "bundle", root / "runs" / "bundle")
    (root / "runs" / "client").mkdir()
    shutil.copy(client / "runs" / "privacy_ledger.json", root / "runs" / "client")
    exp = RunLayout(root / "runs" / "exp")
    shutil.copytree(client / "bundle", exp.bundle_dir)
    write_eval_result(exp.eval_file("base"), {
        "method": "base", "family": "base", "epsilon": None, "model": {"kind": "test"}, "n": 4,
        "metrics": dict.fromkeys(METRIC_KEYS, 0.25), "privacy": dict.fromkeys(PRIVACY_KEYS)})
    return root


def cheap_lines() -> list[tuple[str, bool]]:
    """The README's cheap command lines, once each (`ksg bundle verify DIR` is `ksg bundle verify runs/bundle`)."""
    seen, out = set(), []
    for line, inline in KSG:
        _, argv, name_only = ksg_argv(line, inline)
        if cheap(argv) and not name_only and tuple(argv) not in seen:
            seen.add(tuple(argv))
            out.append((line, inline))
    return out


CHEAP_LINES = cheap_lines()


@pytest.mark.parametrize("line,inline", CHEAP_LINES, ids=[line for line, _ in CHEAP_LINES])
def test_a_cheap_readme_command_runs(line, inline, readme_dir):
    """As a user types it (the `ksg` console script), in the README's layout: exit 0, no traceback."""
    _, argv, _ = ksg_argv(line, inline)
    ksg = shutil.which("ksg", path=str(Path(sys.executable).parent)) or shutil.which("ksg")
    command = [ksg] if ksg else [sys.executable, "-m", "ksg_ray.cli"]
    done = subprocess.run([*command, *argv], cwd=readme_dir, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "KSG_DEBUG"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"README line {line!r}:\n{done.stderr}"
    assert CHEAP[cheap(argv)] in done.stdout, done.stdout


def test_the_cheap_commands_the_readme_shows_are_run():
    shown = {cheap(ksg_argv(line, inline)[1]) for line, inline in CHEAP_LINES}
    assert {"bundle verify", "privacy show", "config show", "report"} <= shown  # `ksg models` is not in it


@pytest.mark.parametrize("line", JOBS)
def test_a_readme_ray_job_line_is_accepted(line, capsys, monkeypatch):
    """`ray job submit [OPTIONS] -- python jobs/X.py ARGS`: the script answers --help and its ARGS validate."""
    monkeypatch.chdir(REPO)
    words = shlex.split(line)
    entry = words[words.index("--") + 1:]
    assert entry[0] == "python" and entry[1].startswith("jobs/"), line
    script = REPO / entry[1]
    assert script.is_file(), f"README line {line!r}: no {entry[1]}"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    stage = next(name for name, (module, _, _) in cli.STAGES.items() if module == f"ksg_ray.jobs.{script.stem}")
    args = entry[2:]
    if "--config" in args:
        i = args.index("--config")
        args = [args[i + 1], *args[:i], *args[i + 2:]]
    assert cli.main(["config", "show", stage, *args]) == 0, f"README line {line!r}: {capsys.readouterr().err}"


def test_ray_job_submit_takes_the_readme_options():
    options = {w.split("=")[0] for line in JOBS for w in shlex.split(line)[3:shlex.split(line).index("--")]
               if w.startswith("-")}
    done = subprocess.run(["ray", "job", "submit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(option in done.stdout for option in options), (options, done.stdout)
