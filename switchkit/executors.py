"""Ray for more than one machine: independent pieces of a job (synthesis shards, eval cells) as Ray tasks.

``synthesis.executor=ray`` and ``eval.executor=ray`` call :func:`run_on_ray`. Each task asks for
``ray.num_gpus`` GPUs and ``ray.num_cpus`` CPUs (a task loads the whole pool: with three candidates on
``cuda:0..2``, ``ray.num_gpus=3``; Ray sets ``CUDA_VISIBLE_DEVICES`` to the task's GPUs). ``ray.address`` joins
a running cluster (``auto`` from a node of it); null starts a local one. Tasks write their results into the run
folder as the single-process job does (atomically, resumable), so every node must see ``run_dir`` (shared
storage); the driver then merges, and a killed job resumes from what the tasks saved.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

from .config import ConfigError, RayConfig

INSTALL = "pip install 'switchkit[ray]'"


def ray_installed() -> bool:
    """Whether the ``ray`` package can be imported."""
    return importlib.util.find_spec("ray") is not None


def run_on_ray(cfg: RayConfig, fn: Callable[..., Any], calls: Sequence[tuple], what: str) -> list:
    """``[fn(*args) for args in calls]``, each call a Ray task; results in order. ``what`` names the job in errors."""
    if not ray_installed():
        raise ConfigError(f"{what}: executor=ray needs Ray, which is not installed: {INSTALL}")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus, max_retries=0)(fn)
        return ray.get([task.remote(*args) for args in calls])
    except ray.exceptions.RayTaskError as exc:  # the task's own error (a one-line user error stays one)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    finally:
        if started:
            ray.shutdown()
