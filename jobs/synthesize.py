"""SERVER SIDE — synthesise a domain dataset from the client's bundle (KnowledgeSG + RewardDS) on Ray Data.

    ksg synthesize configs/synthesize.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/synthesize.py --config configs/synthesize.yaml

Inputs: the bundle (`bundle=DIR`, verified) and this public config. There is no private data path: the
schema has none, and nothing here opens one. Outputs in `run.output_dir`: `synthetic.jsonl` /
`synthetic.parquet` (records with provenance), `funnel.json`, `rejected.jsonl`, `errors.jsonl` and the
per-phase stores a rerun resumes from.
"""

from __future__ import annotations

import json
import logging
import sys

from ksg_ray.common.config import job_config
from ksg_ray.server.synth.config import SynthConfig

logger = logging.getLogger("ksg.synthesize")
CONFIG = SynthConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])

    import ray

    from ksg_ray.server.synth.pipeline import run_synthesis

    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    summary = run_synthesis(cfg)
    print_funnel(summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("funnel", "rewards")}, indent=2))
    return summary


def print_funnel(summary: dict) -> None:
    width = max(len(name) for name, _ in summary["funnel"])
    print("\nsynthesis funnel")
    for name, count in summary["funnel"]:
        print(f"  {name:<{width}}  {count:>6}")
    print(f"  {'failed rows (see errors.jsonl; a rerun retries them)':<{width}}  {summary['failed_rows']:>6}\n")


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(sys.argv[1:])
