"""Shared by the `ray job submit` entrypoints in this folder: connect, then run one CLI command.

Under `ray job submit` (or on a cluster node with RAY_ADDRESS set) the driver joins that cluster
with `ray.init(address="auto")` before anything else, so every stage's `init_ray` finds Ray
already connected. It passes no runtime_env of its own: the job's (working_dir, env_vars)
already reaches every worker, and Ray refuses to merge a driver env_vars key that the job also
sets (`init_ray` forwards HF_HOME etc., which a job's runtime_env typically sets too). Without
RAY_ADDRESS nothing is started here: the pipeline starts an embedded local Ray sized by
`run.num_cpus`, so `python jobs/run_pipeline.py --config ...` also works on a laptop.
"""

from __future__ import annotations

import os
import sys


def main(command: str, argv: list[str] | None = None) -> None:
    """Run `lambert-ray <command> <argv>` (argv: `--config PATH [--set k=v ...]`).

    Exits with the CLI's status, so Ray marks the job FAILED on a bad config or a failed stage.
    """
    from lambert_ray.cli import app

    if os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address="auto", log_to_driver=True)
    app([command, *(sys.argv[1:] if argv is None else argv)], prog_name=f"python {sys.argv[0]}")
