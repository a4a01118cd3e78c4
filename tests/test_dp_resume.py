"""Killing a Ray Train worker mid-run: the run resumes from its last checkpoint and ends where an
uninterrupted run ends — same ε, same number of steps, and (replayed sampling and noise) the same adapter."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import my_processes
from safetensors.torch import load_file

from ksg_ray.client.privacy.accountant import epsilon_for
from ksg_ray.jobs import dp_finetune

pytestmark = pytest.mark.e2e  # real Ray clusters and trainings: the long tests, at their smallest settings

STEPS = 5
COMMON = ["model.name=tiny-random", "data.limit=16", "data.max_seq_len=48", "train.expected_batch_size=4",
          "train.epochs=2",
          f"train.max_steps={STEPS}", "train.checkpoint_every=1", "scaling.num_workers=2", "privacy.delta=1e-3",
          "privacy.noise_seed=5", "privacy.sampling_seed=6", "run.max_failures=1"]


def _kill_a_worker_after_checkpoint(run_dir, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if list(run_dir.glob("checkpoint_0000002/dp_state.pt")):
            workers = my_processes("RayTrainWorker")
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.2)


def test_killed_worker_resumes_with_the_same_epsilon_and_result(ray_cluster, tmp_path):
    killed: list[int] = []
    out_a = tmp_path / "interrupted"
    watcher = threading.Thread(target=_kill_a_worker_after_checkpoint, args=(out_a / "generator", killed))
    watcher.start()
    a = dp_finetune.main(COMMON + [f"run.output_dir={out_a}", f"run.bundle_dir={out_a / 'bundle'}",
                                   f"privacy.ledger_dir={out_a}"])  # two clients: they do not compose
    watcher.join()
    assert killed, "the test must have killed a worker"

    out_b = tmp_path / "uninterrupted"
    b = dp_finetune.main(COMMON + [f"run.output_dir={out_b}", f"run.bundle_dir={out_b / 'bundle'}",
                                   f"privacy.ledger_dir={out_b}"])  # two clients: they do not compose

    progress = json.loads((Path(a["checkpoint"]) / "progress.json").read_text())
    assert len(progress["losses"]) == STEPS  # no step redone twice, none skipped
    expected = epsilon_for([(a["noise_multiplier"], a["sample_rate"], STEPS)], 1e-3)
    assert a["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)
    sd_a = load_file(f"{a['bundle']}/generator/adapter_model.safetensors")
    sd_b = load_file(f"{b['bundle']}/generator/adapter_model.safetensors")
    for k in sd_b:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-5, atol=1e-7)
