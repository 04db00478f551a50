"""Start or join Ray, for the entry points (the stages and the plan never do)."""

from __future__ import annotations

import logging
import os

from pipeline.config import EmbedConfig
from pipeline.run import PreparedRun, prepare_run

logger = logging.getLogger(__name__)


def prepare_and_start_ray(
    config: EmbedConfig, address: str | None, *, run_id: str | None = None
) -> PreparedRun:
    """``prepare_run`` and ``start_ray``, overlapped where that is safe and worth it.

    Bad input or output, and a weights file that is missing or not a checkpoint at all, fail
    first, in a second, before Ray starts. Starting a local Ray takes seconds, so the weights
    (torch import, checks) load meanwhile, and a checkpoint that is not a ResNet50 fails once
    both are done. Joining a running cluster takes a fraction of a second and, in a submitted
    job, may swap the working directory under a thread importing torch: there the weights load
    first, then the driver joins.
    """

    def start() -> None:
        start_ray(address, object_store_memory=config.object_store_memory)

    if joins_running_ray(address):
        prepared = prepare_run(config, run_id=run_id)
        start()
        return prepared
    return prepare_run(config, run_id=run_id, meanwhile=start)


def joins_running_ray(address: str | None) -> bool:
    """Whether ``ray.init`` will join a cluster (``--address`` or ``RAY_ADDRESS``)."""
    return address is not None or bool(os.environ.get("RAY_ADDRESS"))


def start_ray(address: str | None, *, object_store_memory: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray; reuse one already up."""
    import ray

    if ray.is_initialized():
        return
    if not joins_running_ray(address):
        # A local Ray needs no dashboard.
        ray.init(
            include_dashboard=False, log_to_driver=True, object_store_memory=object_store_memory
        )
        return
    if object_store_memory is not None:
        logger.warning(
            "--object-store-memory ignored: joining a running Ray, whose store was sized at "
            "`ray start`"
        )
    ray.init(address=address, log_to_driver=True)
