"""Process set-up shared by recipes: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass


@dataclass
class RayConfig:
    """How a recipe reaches Ray. Under `ray job submit` the job's cluster is used whatever is set here."""

    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit sets it), else a local instance
    num_cpus: int | None = None  # local instance only; None = all cores
    include_dashboard: bool = False  # local instance only


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(cfg: RayConfig | None = None):
    """Connect to the configured cluster or start a local one; a no-op when Ray is already up."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard)
    logging.getLogger(__name__).info("ray resources: %s", ray.cluster_resources())
    return ray
