"""Ray Train's start: a train loop whose config holds model objects, handed over as is vs packed as bytes.

    python bench/ray_train_start.py [--rounds 3]

Ray Train's controller unpickles the loop and its config before it starts a worker. A config holding a peft
config (as ours hold model tasks) makes it import peft, transformers and torch first; `run_torch_trainer` packs
both as bytes that only the workers unpickle (`ksg_ray/common/train_payload.py`). Each round runs an empty loop
both ways, alternating, on one local Ray with 2 CPUs and one 2-CPU worker: `fit()` wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def empty_loop(config: dict) -> None:
    assert config["lora"].r == 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as run_torch_trainer sets it
    import ray
    from peft import LoraConfig
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ksg_ray.common.ray_train import run_torch_trainer
    from ksg_ray.common.sections import ScalingSection

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = {"lora": LoraConfig(r=8)}
    times: dict[str, list[float]] = {"as is": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            start = time.perf_counter()
            TorchTrainer(empty_loop, train_loop_config=config,
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                         torch_config=TorchConfig(backend="gloo"),
                         run_config=RunConfig(name=f"as-is-{r}", storage_path=tmp)).fit()
            times["as is"].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_torch_trainer(empty_loop, config, scaling=ScalingSection(num_workers=1, cpus_per_worker=2),
                              storage=Path(tmp), name=f"packed-{r}", max_failures=0)
            times["packed"].append(time.perf_counter() - start)
            print(f"round {r + 1}: as is {times['as is'][-1]:.1f} s, packed {times['packed'][-1]:.1f} s", flush=True)
    ray.shutdown()
    a, p = statistics.mean(times["as is"]), statistics.mean(times["packed"])
    print(f"fit() of an empty loop, mean of {args.rounds}: config as is {a:.1f} s, packed {p:.1f} s "
          f"({a - p:.1f} s saved a run, {a / p:.2f}x)")


if __name__ == "__main__":
    main()
