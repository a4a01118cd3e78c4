"""Ray Train's local mode against one worker: the embedded default's DP fine-tune, side by side.

    python bench/train_local_mode.py [--rounds 2] [--job dp_train|finetune]

`ksg pipeline` trains five times (DP generator, DP reward, two fine-tune rounds, the non-private baseline). On
one worker each run starts a controller and a worker process, which import the model stack; with
`scaling.num_workers=0` (Ray Train's local mode, `ksg_ray/common/local_train.py`) the loop runs in the job's own
process. Each round runs the job both ways, alternating, in one process with a local Ray up as in the pipeline
(the box's speed drifts by the hour, so only side-by-side figures compare), each run in a fresh directory:
the job's wall time, and what it reports (ε and steps; the fine-tune's steps and best epoch) both ways.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"one worker": ["scaling.num_workers=1", "scaling.cpus_per_worker=2"], "local mode": ["scaling.num_workers=0"]}


def run_dp_train(out: Path, mode: list[str]) -> dict:
    from ksg_ray.jobs import dp_finetune

    return dp_finetune.main(["--config", str(ROOT / "configs/dp_finetune.yaml"), "train.epochs=1",
                             f"run.output_dir={out}", f"run.bundle_dir={out / 'bundle'}",
                             f"privacy.ledger_dir={out}", *mode])


def run_finetune(out: Path, mode: list[str]) -> dict:
    from ksg_ray.common.records import load_records
    from ksg_ray.jobs import finetune

    out.mkdir(parents=True)
    data = out / "synthetic.jsonl"  # the demo records as a synthetic set (public text: the packaged demo)
    data.write_text("".join(json.dumps({"id": f"q{i}", "round": 0, "instruction": r.instruction, "input": r.input,
                                        "output": r.output}) + "\n" for i, r in enumerate(load_records("demo"))))
    return finetune.main(["--config", str(ROOT / "configs/finetune.yaml"), f"data.path={data}", "train.epochs=1",
                          "dev.limit=4", "dev.max_new_tokens=32", f"run.output_dir={out}", *mode])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--job", choices=["dp_train", "finetune"], default="dp_train")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, log_to_driver=False)  # up before the runs, as in `ksg pipeline`
    job = run_dp_train if args.job == "dp_train" else run_finetune
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, mode in MODES.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                start = time.perf_counter()
                result = job(out, mode)
                times[name].append(time.perf_counter() - start)
                said = {k: result.get(k) for k in ("epsilon", "steps", "train_loss", "best_epoch") if k in result}
                print(f"round {r + 1}, {name}: {times[name][-1]:.1f} s {said}", flush=True)
    ray.shutdown()
    w, local = statistics.mean(times["one worker"]), statistics.mean(times["local mode"])
    print(f"{args.job}, mean of {args.rounds}: one worker {w:.1f} s, local mode {local:.1f} s "
          f"({w - local:.1f} s saved a run, {w / local:.2f}x)")


if __name__ == "__main__":
    main()
