"""Ray connection: embedded local Ray by default, `ray.init(address=...)` for a cluster."""

from __future__ import annotations

import logging
import os

from lambert_ray import console

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once. address None -> a fresh local Ray (never silently attaches to a running
    cluster); 'auto' or 'ray://...' -> that cluster. RAY_ADDRESS (set by `ray job submit`) wins."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or address
    # Where things are, never credentials (a runtime_env is visible in the dashboard): workers
    # on a cluster get cloud credentials from their instance role / service account.
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "LAMBERT_CACHE",
                                           "LAMBERT_DATA_DIR", "TORCH_EXTENSIONS_DIR",
                                           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                           "AWS_REGION", "AWS_DEFAULT_REGION")
                if k in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside `ray job submit`: the job's runtime_env already carries the environment, and
        # Ray refuses to merge a second one that names the same variables.
        runtime_env = None
    # Quiet by default: the workers' logs (and the Train placement-group cleaner's retries)
    # stay in Ray's log files, and the console shows lambert_ray's progress lines instead of
    # Ray Data's bars. `--verbose` (console.set_verbose) brings them back.
    loud = console.verbose()
    level = logging.INFO if loud else logging.ERROR
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=loud, logging_level=level)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=loud, logging_level=level)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = loud
    if not loud:  # Ray Data's console handler only: its session log file keeps everything
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR)
    log.info("ray resources: %s", ray.cluster_resources())
