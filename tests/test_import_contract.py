"""The trust boundary is checked, not only written down: `lint-imports` keeps the contracts in pyproject.toml,
and breaks them when a server module imports client code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy's ksg_ray, not the installed one
    cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
           "--no-cache"]
    return subprocess.run(cmd, cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("ksg_ray", "jobs", "serve"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "demo_data"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_contracts_hold_and_catch_a_planted_server_to_client_import(tmp_path):
    tree = _copy(tmp_path)
    clean = _lint(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout

    (tree / "ksg_ray" / "server" / "planted.py").write_text(
        '"""A server module that reaches into client code."""\nfrom ksg_ray.client.privacy import ledger  # noqa\n')
    broken = _lint(tree)
    assert broken.returncode != 0
    assert "client and server are independent BROKEN" in broken.stdout
    assert "ksg_ray.server.planted -> ksg_ray.client.privacy.ledger" in broken.stdout


def test_side_free_code_may_not_import_a_side(tmp_path):
    tree = _copy(tmp_path)
    (tree / "ksg_ray" / "common" / "planted.py").write_text("from ksg_ray.server.synth import store  # noqa\n")
    broken = _lint(tree)
    assert broken.returncode != 0
    assert "common, engines and the bundle import no side BROKEN" in broken.stdout
