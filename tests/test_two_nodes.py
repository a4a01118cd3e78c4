"""Past one machine, simulated: a two-node Ray cluster on 127.0.0.1 (a `ray start --head` and a second
`ray start --address` node, 1 CPU each), and the jobs submitted to it as on a real cluster with
`ray job submit --working-dir .`:

- the synthesis job, its engine actors pinned to the nodes by a custom resource both offer, and spread;
- a DP fine-tune with one Ray Train worker per node (gloo across the two raylets), pinned the same way;
- one shared storage directory for both.

Ray's state API then names the node of every actor and worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import free_ports
from test_pipeline_job import RAY, ROOT, TINY, TINY_DP

# what each node offers: engines (two: a phase's actors start while the last phase's are still shutting down) and
# one Ray Train worker
SLOTS = {"engine_slot": 2, "trainer_slot": 1}


@pytest.fixture
def two_nodes():
    """(dashboard URL, GCS address) of a head and a worker node of 1 CPU each; the session's local Ray is shut
    down around it (one cluster at a time on this machine)."""
    import ray
    from conftest import init_local_ray, start_cli_node, stop_cli_cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    gcs, dashboard = free_ports(2)
    resources = f"--resources={json.dumps(SLOTS)}"
    temp_dir = tempfile.mkdtemp(prefix="ksg-ray-")  # short: Ray's socket paths live under it
    try:
        # a temp dir per node, as on two machines: nodes sharing one clean up each other's job packages
        start_cli_node(f"{temp_dir}/h", "--head", "--num-cpus=1", resources, f"--port={gcs}",
                       "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
        start_cli_node(f"{temp_dir}/w", "--num-cpus=1", resources, f"--address=127.0.0.1:{gcs}")
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}"
    finally:
        stop_cli_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if was_up:
            init_local_ray()


def _submit(dashboard: str, *args: str) -> str:
    runtime_env = {"working_dir": str(ROOT),
                   "env_vars": {k: os.environ[k] for k in ("KSG_CACHE", "HF_HUB_OFFLINE", "RAY_AUTH_MODE",
                                                           "TORCH_EXTENSIONS_DIR") if k in os.environ}}
    job = subprocess.run([RAY, "job", "submit", "--address", dashboard, "--runtime-env-json",
                          json.dumps(runtime_env), "--", "python", *args],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    print(job.stdout[-3000:], job.stderr[-2000:])
    assert job.returncode == 0, job.stderr[-2000:]
    return job.stdout


def _placements(dashboard: str, class_name: str) -> list[tuple[str, str, str]]:
    """(class, actor id, node id) of every actor whose class name holds `class_name` and that was placed on a
    node, dead ones included (an actor a pool asked for but never needed has no node)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)
    return [(a.class_name, a.actor_id, a.node_id) for a in actors if class_name in a.class_name and a.node_id]


@pytest.mark.e2e
def test_synthesis_and_dp_training_use_both_nodes(two_nodes, client_bundle, tmp_path):
    from ray.util.state import list_nodes

    dashboard, _ = two_nodes
    nodes = {n.node_id: "head" if n.is_head_node else "worker" for n in list_nodes(address=dashboard)}
    assert sorted(nodes.values()) == ["head", "worker"]
    shared = tmp_path / "shared"  # both raylets see it: the storage of every job

    bundle_dir = client_bundle[0] / "bundle"
    synth = TINY["synthesize.overrides"] + [
        f"bundle={bundle_dir}", f"run.output_dir={shared / 'synth'}", "refine.rounds=0", "engine.min_actors=2",
        "engine.max_actors=2", "engine.num_cpus=0.5", "engine.fuse_steps=true", "engine.spread=true",
        "engine.resources={engine_slot: 1}"]
    out = _submit(dashboard, "jobs/synthesize.py", "--config", "configs/synthesize.yaml", *synth)
    assert '"failed_rows": 0' in out
    assert (shared / "synth" / "synthetic.jsonl").read_text().strip()
    # Ray Data names them MapWorker(MapBatches(GenerateUDF)) (queries), MapWorker(MapBatches(StepChain)) (answers)
    engines = _placements(dashboard, "MapWorker(MapBatches(")
    dp = [o for o in TINY_DP if not o.startswith("scaling.")] + [
        "data.path=demo", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "scaling.resources_per_worker={trainer_slot: 1}", f"run.output_dir={shared / 'dp'}",
        f"privacy.ledger_dir={shared / 'ledger'}", f"run.bundle_dir={shared / 'bundle'}"]
    _submit(dashboard, "jobs/dp_finetune.py", "--config", "configs/dp_finetune.yaml", *dp)
    workers = _placements(dashboard, "RayTrainWorker")

    print(f"\n{'actor':<40} {'id':<16}   node")
    for name, actor, node in engines + workers:
        print(f"{name:<40} {actor[:16]}   {nodes[node]} ({node[:12]})")
    assert {nodes[n] for _, _, n in engines} == {"head", "worker"}
    assert len(workers) == 2 and {nodes[n] for _, _, n in workers} == {"head", "worker"}
    assert json.loads((shared / "bundle" / "privacy.json").read_text())  # the DP job's release, on the shared storage
