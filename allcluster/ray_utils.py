"""Connecting to Ray: an existing cluster (Slurm bootstrap, ``RAY_ADDRESS``) or a local one."""
from __future__ import annotations

import os

# Settings the driver's environment hands to every Ray worker (caches and offline weight stores).
PASSED_TO_WORKERS = ("ALLCLUSTER_CACHE_DIR", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process.

    ``address`` (or ``$RAY_ADDRESS``, which ``slurm/ray-cluster.sh`` exports) joins a running
    cluster; otherwise a local single-node Ray starts with this machine's CPUs (and GPUs).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env_vars.update({k: os.environ[k] for k in PASSED_TO_WORKERS if os.environ.get(k)})
    env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
