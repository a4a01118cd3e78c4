"""torch's fp32 matmul at this CPU's speed on AMD: MKL on its Intel code path.

torch's CPU wheels do fp32 matmul in Intel MKL, and MKL picks its code path by CPU *vendor*: on an AMD CPU it
takes its generic AVX2 kernels even where the CPU has AVX-512. Measured here (`bench/cpu_limits.py`, a 2-core
AMD EPYC with AVX-512): 2048² fp32 matmul at about 90 GFLOP/s per thread on that path, 229 on MKL's Intel path,
with the same error against fp64; the DP step and generation run about 1.9x faster (`bench/dp_speed.py`).

MKL asks one internal function whether the CPU is Intel (`mkl_serv_intel_cpu_true`). A one-line shared library
that answers yes, loaded before MKL (`LD_PRELOAD`), puts MKL on its Intel dispatch, which still chooses its
kernels by the CPU's feature flags. This is the well-known workaround for MKL on AMD; it changes which kernels
run, not what they compute. The library is compiled once with the system C compiler into the cache.

`LD_PRELOAD` only acts when a process starts, so the `ksg` command and the `jobs/` scripts re-execute themselves
once with it (`reexec_with_mkl_intel_path`); the local Ray cluster they start, and its workers, inherit it. A Ray
cluster started elsewhere (`ray start`), or a test run, gets it from `eval "$(python -m ksg_ray.common.cpu_blas)"`,
which prints the `export LD_PRELOAD=...` line where it applies (and nothing elsewhere). `KSG_MKL_INTEL_PATH=0`
turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["ENV", "active", "describe", "preload_env", "reexec_with_mkl_intel_path", "why_not"]

logger = logging.getLogger(__name__)

ENV = "KSG_MKL_INTEL_PATH"  # "0": leave MKL as it is
SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
LIBRARY = "mkl_intel_path.so"


def why_not() -> str | None:
    """None where the Intel path applies here; otherwise why not, in a few words."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"not Linux x86_64 ({platform.system()} {platform.machine()})"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo"
    if "AuthenticAMD" not in cpuinfo:
        return "not an AMD CPU (MKL already takes its best path)"
    if " avx2" not in cpuinfo:
        return "the CPU has no AVX2"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the one-line library"
    return None


def _library() -> Path | None:
    """The compiled library in the cache (built on first use); None if it cannot be built."""
    from ksg_ray.common.hub import cache_root

    out = cache_root() / "cpu_blas" / LIBRARY
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_text(SOURCE)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src)], capture_output=True, text=True)
    if done.returncode:
        logger.warning("MKL Intel path: building %s failed: %s", out, done.stderr.strip()[-500:])
        return None
    tmp.replace(out)  # atomic: concurrent builders never load a half-written file
    return out


def preload_env() -> dict[str, str] | None:
    """{"LD_PRELOAD": ...} with the library in front, or None where it does not apply (`why_not`)."""
    if why_not() is not None or (lib := _library()) is None:
        return None
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and Path(p).name != LIBRARY]
    return {"LD_PRELOAD": ":".join([str(lib), *current])}


def active() -> bool:
    """Whether this process started with the library preloaded."""
    return any(Path(p).name == LIBRARY for p in os.environ.get("LD_PRELOAD", "").split(":"))


def describe() -> str:
    """One line for a job's log: which fp32 matmul path this process runs."""
    if active():
        return "fp32 matmul: MKL on its Intel code path (LD_PRELOAD, ksg_ray.common.cpu_blas)"
    return f"fp32 matmul: torch's default path ({why_not() or 'not preloaded at start'})"


def reexec_with_mkl_intel_path() -> None:
    """Re-execute this command once with the library preloaded, where it applies. Call it first thing in a
    command's entry point (never in library code or under pytest, whose output capture the new process would
    inherit: it replaces the process)."""
    if active() or os.environ.get("_KSG_MKL_REEXEC") == "1":
        return  # already on it, or tried once already
    env = preload_env()
    if env is None:
        return
    os.environ.update(env | {"_KSG_MKL_REEXEC": "1"})
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


if __name__ == "__main__":  # eval "$(python -m ksg_ray.common.cpu_blas)": the export line where it applies
    import shlex

    if (env := preload_env()) is not None:
        print(f"export LD_PRELOAD={shlex.quote(env['LD_PRELOAD'])}")
