"""Ray Train's local mode (`scaling.num_workers: 0`) with checkpoints that outlive the process.

With `ScalingConfig(num_workers=0)` Ray Train runs the loop in the calling process: no controller or worker
process starts (two processes, the worker's imports of torch, transformers, peft and opacus, the gloo group), which
on a 2-core machine took a DP fine-tune of the embedded default from 62.6 to 39.3 s side by side
(`bench/train_local_mode.py`). Ray 2.60's local mode keeps only the
last reported checkpoint, in memory, pointing at the loop's temporary directory, and never reads the run's
storage, so a rerun would start again from step 0. `PersistentLocalRun` stands in for Ray's local train-function
utilities while the loop runs: each reported checkpoint is copied to `storage/name/<checkpoint_dir_name>` as Ray
Train's storage does on workers, the `CheckpointConfig` keeps what Ray's checkpoint manager keeps (the latest and
the `num_to_keep` best), and a rerun's `ray.train.get_checkpoint()` is the latest one: a job that died resumes
as it does on workers (a run begun on workers too, from Ray's own record of its checkpoints; not the reverse).
One process means one worker: no DeepSpeed, and no worker restarts (`max_failures`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, CheckpointConfig
from ray.train.v2._internal.execution.train_fn_utils import (
    LocalTrainFnUtils,
    get_train_fn_utils,
    set_train_fn_utils,
)

from ksg_ray.common.jsonl import write_json_atomic
from ksg_ray.common.train_payload import run_packed

__all__ = ["INDEX_FILE", "LOCAL_RUN_KEY", "PersistentLocalRun", "local_run_config", "run_packed_locally"]

INDEX_FILE = "local_checkpoints.json"  # in storage/name: the kept checkpoints and their scores, in report order
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray Train's checkpoint manager writes there on workers
LOCAL_RUN_KEY = "ksg_local_run"  # the train_loop_config entry that says where the run persists
logger = logging.getLogger(__name__)


class PersistentLocalRun(LocalTrainFnUtils):
    """Ray's local-mode train-function utilities, with the run's checkpoints kept in `run_dir`.

    Args:
        local: the utilities Ray's local controller set for this run (its train context is kept).
        run_dir: `storage/name`, where the checkpoints and `INDEX_FILE` live.
        checkpoint_config: which checkpoints to keep, as for a run on workers.
    """

    def __init__(self, local: LocalTrainFnUtils, run_dir: Path, checkpoint_config: CheckpointConfig) -> None:
        self.__dict__.update(local.__dict__)  # Ray's train context and dataset shards for this run
        self.run_dir, self.checkpoint_config = Path(run_dir), checkpoint_config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for partial in self.run_dir.glob(".partial-*"):  # copies a killed process left unfinished
            shutil.rmtree(partial, ignore_errors=True)
        index = self.run_dir / INDEX_FILE
        entries = json.loads(index.read_text()) if index.is_file() else self._entries_from_workers()
        self.entries: list[dict[str, Any]] = [e for e in entries if (self.run_dir / e["dir"]).is_dir()]
        self._last_metrics = None
        self._last_checkpoint = self._checkpoint(self.entries[-1]) if self.entries else None

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None = None,
               checkpoint_dir_name: str | None = None, **_: Any) -> None:
        """Keep the metrics; copy a checkpoint into the run directory, then drop what the config does not keep."""
        self._last_metrics = metrics
        if checkpoint is None:
            return
        name = checkpoint_dir_name or datetime.now().strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")  # Ray's default
        partial, dest = self.run_dir / f".partial-{name}", self.run_dir / name
        shutil.copytree(checkpoint.path, partial)
        shutil.rmtree(dest, ignore_errors=True)
        self.entries = [e for e in self.entries if e["dir"] != name] + [self._entry(name, metrics)]
        self._drop_unkept()
        # The index first, then the folder: a process killed in between leaves an entry whose folder is missing,
        # which the next run skips (it resumes from the checkpoint before), never a folder the index lacks.
        write_json_atomic(self.run_dir / INDEX_FILE, self.entries, indent=None)
        partial.rename(dest)
        self._last_checkpoint = self._checkpoint(self.entries[-1])

    def _entries_from_workers(self) -> list[dict[str, Any]]:
        """A run begun on Ray Train workers: its checkpoints as Ray's checkpoint manager recorded them in
        `RAY_SNAPSHOT` (Ray 2.60's format), in report order, so local mode resumes it; [] if there is none."""
        try:
            snapshot = json.loads((self.run_dir / RAY_SNAPSHOT).read_text())
            reported = sorted(zip(snapshot["checkpoint_report_indices"], snapshot["checkpoint_results"],
                                  strict=True), key=lambda pair: pair[0])
            latest = snapshot["latest_checkpoint_result"]  # null when the run reported no checkpoint
            latest_name = latest["checkpoint_dir_name"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [self._entry(r["checkpoint_dir_name"], r["metrics"]) for _, r in reported
                if r["checkpoint_dir_name"] != latest_name] + [self._entry(latest_name, latest["metrics"])]

    def _entry(self, name: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """One index entry: the checkpoint's folder and its score (None without one, or NaN)."""
        attribute = self.checkpoint_config.checkpoint_score_attribute
        score = float(metrics[attribute]) if attribute and metrics.get(attribute) is not None else math.nan
        return {"dir": name, "score": None if math.isnan(score) else score}

    def get_checkpoint(self) -> Checkpoint | None:
        return self._last_checkpoint

    def _checkpoint(self, entry: dict[str, Any]) -> Checkpoint:
        return Checkpoint.from_directory(str(self.run_dir / entry["dir"]))

    def _drop_unkept(self) -> None:
        """Ray's rule: rank by the score attribute (else by age), delete all but the `num_to_keep` best, never
        the latest."""
        keep = self.checkpoint_config.num_to_keep
        if keep is None or len(self.entries) <= keep:
            return
        scored = self.checkpoint_config.checkpoint_score_attribute is not None
        sign = 1 if self.checkpoint_config.checkpoint_score_order == "max" else -1

        def rank(i: int) -> tuple[float, int]:  # higher is better; a tie keeps the newer
            score = self.entries[i]["score"]
            return (0.0 if not scored else -math.inf if score is None else sign * score, i)

        best = set(sorted(range(len(self.entries)), key=rank)[-keep:]) | {len(self.entries) - 1}
        for i, entry in enumerate(self.entries):
            if i not in best:
                shutil.rmtree(self.run_dir / entry["dir"], ignore_errors=True)
        self.entries = [e for i, e in enumerate(self.entries) if i in best]


def local_run_config(run_dir: Path, checkpoint_config: CheckpointConfig) -> dict[str, Any]:
    """The `train_loop_config` entry `run_packed_locally` reads (plain values: Ray may log the config)."""
    return {LOCAL_RUN_KEY: {"run_dir": str(run_dir), "num_to_keep": checkpoint_config.num_to_keep,
                            "score_attribute": checkpoint_config.checkpoint_score_attribute,
                            "score_order": checkpoint_config.checkpoint_score_order}}


def run_packed_locally(config: dict[str, Any]) -> None:
    """The `train_loop_per_worker` of a local-mode run: `run_packed`, with the run's checkpoints persisted."""
    local = get_train_fn_utils()
    if not isinstance(local, LocalTrainFnUtils):
        raise RuntimeError("run_packed_locally runs in Ray Train's local mode only (ScalingConfig(num_workers=0))")
    spec = config[LOCAL_RUN_KEY]
    checkpoint_config = CheckpointConfig(num_to_keep=spec["num_to_keep"],
                                         checkpoint_score_attribute=spec["score_attribute"],
                                         checkpoint_score_order=spec["score_order"])
    run = PersistentLocalRun(local, Path(spec["run_dir"]), checkpoint_config)
    if run.get_checkpoint() is not None:
        logger.info("Ray Train local mode: resuming %s from %s", spec["run_dir"], run.get_checkpoint().path)
    set_train_fn_utils(run)
    run_packed(config)
