"""MKL on its Intel code path (`ksg_ray.common.cpu_blas`): the preloaded library answers MKL's vendor check, the
matmul stays exact to fp32, and a command re-executes itself onto it once (or not at all when turned off)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ksg_ray.common import cpu_blas

pytestmark = pytest.mark.skipif(cpu_blas.why_not() is not None, reason=f"does not apply here: {cpu_blas.why_not()}")

PROBE = textwrap.dedent("""
    import ctypes, torch
    x, y = torch.randn(512, 512), torch.randn(512, 512)
    ref = x.double() @ y.double()
    err = float(((x @ y).double() - ref).abs().max() / ref.abs().max())
    print(ctypes.CDLL(None).mkl_serv_intel_cpu_true(), torch.backends.mkl.is_available(), err)
""")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_KSG_MKL_REEXEC", cpu_blas.ENV)}
    return env | extra


def test_the_preloaded_library_answers_the_vendor_check_and_matmul_stays_exact():
    env = cpu_blas.preload_env()
    assert env is not None and env["LD_PRELOAD"].endswith(cpu_blas.LIBRARY)
    out = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env(**env), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["1", "True"]
    assert float(out[2]) < 1e-5


@pytest.mark.parametrize(("setting", "expected"), [(None, "True"), ("0", "False")])
def test_a_command_reexecutes_itself_onto_the_intel_path_once(tmp_path, setting, expected):
    script = tmp_path / "cmd.py"
    script.write_text("import os, sys\nfrom ksg_ray.common import cpu_blas\n"
                      "print('start', flush=True)\ncpu_blas.reexec_with_mkl_intel_path()\n"
                      "print(cpu_blas.active(), sys.argv[1:], cpu_blas.describe())\n")
    env = _clean_env(**({cpu_blas.ENV: setting} if setting else {}))
    out = subprocess.run([sys.executable, str(script), "a", "b=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[-1].startswith(f"{expected} ['a', 'b=1']")
    assert out.count("start") == (2 if expected == "True" else 1)  # re-executed once, with the same arguments
