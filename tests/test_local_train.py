"""Ray Train's local mode (`scaling.num_workers=0`): the loop runs in the job's process, and its checkpoints are
kept as on workers (`ksg_ray/common/local_train.py`): a job killed mid-run resumes and ends where an uninterrupted
run ends; the checkpoints kept are the latest and the best, as Ray's checkpoint manager keeps them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint, CheckpointConfig
from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils
from safetensors.torch import load_file

from ksg_ray.client.privacy.accountant import epsilon_for
from ksg_ray.common.local_train import INDEX_FILE, PersistentLocalRun
from ksg_ray.common.ray_train import run_torch_trainer
from ksg_ray.common.sections import ScalingSection
from ksg_ray.jobs import dp_finetune

STEPS = 5
COMMON = ["model.name=tiny-random", "data.limit=16", "data.max_seq_len=48", "train.expected_batch_size=4",
          "train.epochs=2", f"train.max_steps={STEPS}", "train.checkpoint_every=1", "scaling.num_workers=0",
          "privacy.delta=1e-3", "privacy.noise_seed=5", "privacy.sampling_seed=6"]
# The job in a child process that SIGKILLs itself right after step 2's checkpoint is persisted: a real death of
# the process that trains (in local mode that is the job itself), at a known step.
KILLED_AT_STEP_2 = """
import os, signal, sys
from ksg_ray.common import local_train
report = local_train.PersistentLocalRun.report
def report_then_die(self, metrics, checkpoint=None, **kw):
    report(self, metrics, checkpoint=checkpoint, **kw)
    if checkpoint is not None and metrics.get("step") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
local_train.PersistentLocalRun.report = report_then_die
from ksg_ray.jobs import dp_finetune
dp_finetune.main(sys.argv[1:])
"""


def _args(out: Path) -> list[str]:
    return COMMON + [f"run.output_dir={out}", f"run.bundle_dir={out / 'bundle'}", f"privacy.ledger_dir={out}"]


def test_a_killed_local_run_resumes_with_the_same_epsilon_and_result(tmp_path, caplog):
    out_a = tmp_path / "interrupted"
    died = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_2, *_args(out_a)], capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    index = json.loads((out_a / "generator" / INDEX_FILE).read_text())
    assert [e["dir"] for e in index] == ["checkpoint_0000001", "checkpoint_0000002"]
    assert not (out_a / "bundle").exists()
    killed = json.loads((out_a / "generator" / "checkpoint_0000002" / "progress.json").read_text())["losses"]

    caplog.set_level(logging.INFO, logger="ksg_ray.client.dp_trainer")
    a = dp_finetune.main(_args(out_a))  # the same job again, in this process
    assert "rank 0 resumes at step 2" in caplog.text
    b = dp_finetune.main(_args(tmp_path / "uninterrupted"))

    progress = json.loads((Path(a["checkpoint"]) / "progress.json").read_text())
    assert len(progress["losses"]) == STEPS  # no step redone, none skipped
    assert progress["losses"][:2] == pytest.approx(killed)  # steps 1-2 are the killed process's
    expected = epsilon_for([(a["noise_multiplier"], a["sample_rate"], STEPS)], 1e-3)
    assert a["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)  # the killed run's steps counted once
    sd_a = load_file(f"{a['bundle']}/generator/adapter_model.safetensors")
    sd_b = load_file(f"{b['bundle']}/generator/adapter_model.safetensors")
    for k in sd_b:  # replayed sampling and noise: the same adapter as the run that was never killed
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-5, atol=1e-7)
    kept = sorted(p.name for p in (out_a / "generator").glob("checkpoint_*"))
    assert kept == ["checkpoint_0000004", "checkpoint_0000005"]  # num_to_keep=2, as on workers


def _report_four(run_dir: Path, tmp_path: Path, config: CheckpointConfig) -> PersistentLocalRun:
    run = PersistentLocalRun(LocalTrainFnUtils(experiment_name="t"), run_dir, config)
    for i, score in enumerate([0.1, 0.5, 0.3, 0.2]):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "weights.txt").write_text(str(i))
        run.report({"score": score, "i": i}, checkpoint=Checkpoint.from_directory(str(src)),
                   checkpoint_dir_name=f"checkpoint_{i}")
    return run


def test_kept_checkpoints_are_the_best_by_score_and_the_latest(tmp_path):
    run_dir = tmp_path / "run"
    run = _report_four(run_dir, tmp_path, CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="score",
                                                           checkpoint_score_order="max"))
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_1", "checkpoint_3"]
    assert Path(run.get_checkpoint().path).name == "checkpoint_3"
    assert (Path(run.get_checkpoint().path) / "weights.txt").read_text() == "3"  # a copy, not the loop's temp dir
    again = PersistentLocalRun(LocalTrainFnUtils(experiment_name="t"), run_dir, CheckpointConfig(num_to_keep=1))
    assert Path(again.get_checkpoint().path).name == "checkpoint_3"  # a rerun resumes from the latest


def test_without_a_score_the_latest_are_kept_and_a_missing_folder_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    _report_four(run_dir, tmp_path, CheckpointConfig(num_to_keep=2))
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_2", "checkpoint_3"]
    # killed between the index and the folder's rename: the entry without its folder is passed over
    (run_dir / "checkpoint_3").rename(run_dir / ".partial-checkpoint_3")
    again = PersistentLocalRun(LocalTrainFnUtils(experiment_name="t"), run_dir, CheckpointConfig(num_to_keep=2))
    assert Path(again.get_checkpoint().path).name == "checkpoint_2"


def test_local_mode_refuses_deepspeed(tmp_path):
    with pytest.raises(ValueError, match="local mode.*DeepSpeed"):
        run_torch_trainer(lambda config: None, {}, scaling=ScalingSection(num_workers=0, strategy="deepspeed"),
                          storage=tmp_path, name="x", max_failures=0)


def test_a_run_begun_on_workers_resumes_in_local_mode_from_rays_record(tmp_path):
    """Ray Train's checkpoint manager records a worker run's checkpoints in its snapshot (Ray 2.60's format, as a
    one-worker DP run wrote it here): local mode resumes from that run's latest checkpoint."""
    run_dir = tmp_path / "generator"
    for step in (4, 6):
        (run_dir / f"checkpoint_{step:07d}").mkdir(parents=True)
    result = {"version": 0, "checkpoint_dir_name": "checkpoint_0000006", "metrics": {"step": 6, "loss": 3.05}}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_report_indices": [3, 5], "latest_checkpoint_result": result,
        "checkpoint_results": [{"version": 0, "checkpoint_dir_name": "checkpoint_0000004",
                                "metrics": {"step": 4, "loss": 2.87}}, result]}))
    run = PersistentLocalRun(LocalTrainFnUtils(experiment_name="t"), run_dir, CheckpointConfig(num_to_keep=2))
    assert Path(run.get_checkpoint().path).name == "checkpoint_0000006"
    assert [e["dir"] for e in run.entries] == ["checkpoint_0000004", "checkpoint_0000006"]
