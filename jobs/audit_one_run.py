"""CLIENT SIDE (the auditor) — one-run privacy audit of the DP generator; writes <run.output_dir>/audit/<name>.json.

    ksg audit one-run configs/dp_finetune.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/audit_one_run.py --config configs/dp_finetune.yaml

Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846): m canaries, each trained on with probability 1/2 through the
generator's own DP training, one run, a loss-based guess of which were in, and an ε lower bound at the run's δ
to set beside the claimed ε. By default it trains on the canaries alone: not a run on the private records, so
the client's ledger is unchanged. `audit.records=true` adds the private records (data.*): then it is a run on
them, recorded in the client's ledger and counted in the budget (unless `privacy.publish=false`). See
`ksg_ray.audit.one_run`.
"""

from __future__ import annotations

import sys

from ksg_ray.audit.one_run import OneRunAuditConfig, format_result, run_one_run_audit
from ksg_ray.common.config import job_config

CONFIG = OneRunAuditConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])
    result = run_one_run_audit(cfg)
    print(format_result(result))
    return result


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    main(sys.argv[1:])
