"""`ksg pipeline` as users run it on a cluster: a Ray head started with `ray start --head` on 127.0.0.1, the
pipeline submitted with `ray job submit --working-dir .` at its smallest settings (tiny models), and the
distilled model it deploys on Serve answering through the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # the CLI of the Ray these tests import
TINY_DP = ["model.name=tiny-random", "data.max_seq_len=96", "train.expected_batch_size=4", "train.max_steps=2",
           "scaling.num_workers=1", "privacy.delta=1e-3"]
TINY = {
    "dp_train.overrides": TINY_DP,
    "dp_reward.overrides": TINY_DP + ["candidates.max_new_tokens=8", "privacy.total_epsilon_budget=40"],
    "synthesize.overrides": ["professional.model=tiny-random", "queries.num_prompts=3", "queries.per_prompt=3",
                             "queries.max_new_tokens=12", "queries.min_words=1", "queries.require_question=false",
                             "queries.require_finished=false", "professional.filter=false", "answers.n=2",
                             "answers.max_new_tokens=8", "answers.require_finished=false", "refine.n=2",
                             "refine.critique_max_new_tokens=8", "refine.max_new_tokens=8", "engine.batch_size=4"],
    "finetune.overrides": ["model.name=tiny-random", "train.epochs=1", "dev.limit=2", "dev.max_new_tokens=4",
                           "data.max_seq_len=96", "scaling.num_workers=1"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


@pytest.fixture
def ray_head():
    """A Ray head of its own (the session cluster of the other tests is shut down around it: one cluster at a
    time on this machine), stopped afterwards."""
    import ray
    from conftest import init_local_ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    gcs, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"], check=True, env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, check=False)
        if was_up:
            init_local_ray()


@pytest.mark.e2e
def test_pipeline_submitted_as_a_ray_job_serves_a_model_the_openai_client_can_ask(ray_head, tmp_path):
    port = _free_port()
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "held_out=4", "canaries.fraction=0", "rounds=0",
                 "stages=[dp_train, dp_reward, synthesize, finetune, serve]", f"serve.port={port}"]
    overrides += [f"{k}={_yaml_list(v)}" for k, v in TINY.items()]
    runtime_env = {"working_dir": str(ROOT),
                   "env_vars": {k: os.environ[k] for k in ("KSG_CACHE", "HF_HUB_OFFLINE", "RAY_AUTH_MODE",
                                                           "TORCH_EXTENSIONS_DIR") if k in os.environ}}
    job = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/pipeline.py", "--config", "configs/pipeline.yaml", *overrides],
        capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    print(job.stdout[-4000:], job.stderr[-2000:])
    assert job.returncode == 0, job.stderr[-2000:]
    assert "pipeline stage wall times" in job.stdout and "serving 'ksg-distilled'" in job.stdout
    summary = json.loads((run_dir / "pipeline_summary.json").read_text())
    assert {"dp_train", "dp_reward", "synthesize round 0", "finetune round 0", "serve"} <= set(summary["stage_seconds"])

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == ["ksg-distilled"]
    reply = client.chat.completions.create(model="ksg-distilled", max_tokens=8,
                                           messages=[{"role": "user", "content": "Is a mild fever dangerous?"}])
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
