"""Every stage in order: DP generator, DP reward, synthesis + fine-tune rounds, evaluation, report, serve.

    ksg pipeline configs/pipeline.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline.yaml

Each stage is the same recipe as its own command, called with the paths that connect it to the others
(`ksg_ray.pipeline.runner`); a stage whose verified output exists is skipped, so a rerun after a failure picks
up where it stopped. The private records go to the client stages only (`run_dir/client/` plays the client's
machine); every server stage gets the bundle and public inputs. The evaluation stage plays the auditor: it reads
the held-out split and the members from `run_dir/client/`. Wall time per stage is printed at the end.
"""

from __future__ import annotations

import logging
import sys

from ksg_ray.common.config import job_config
from ksg_ray.pipeline.config import PipelineConfig
from ksg_ray.pipeline.runner import PipelineRunner, format_times

CONFIG = PipelineConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])

    from concurrent.futures import ThreadPoolExecutor

    import ray

    runner = PipelineRunner(cfg)
    with ThreadPoolExecutor(1) as pool:  # a first run's model build (GGUF) beside Ray's start: ~7 s less wall time
        built = pool.submit(runner.build_first_model)
        if not ray.is_initialized():
            ray.init()  # joins the cluster under `ray job submit`, else starts a local one
        built.result()
    summary = runner.run()
    print("\n" + format_times(summary["stage_seconds"]) + "\n")
    return summary


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(sys.argv[1:])
