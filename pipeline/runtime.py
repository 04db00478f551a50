"""Start or join Ray, for the entry points (the stages and the plan never do), and
:func:`embed_images`, the one call that runs the pipeline from Python."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from pipeline.config import ConfigError, EmbedConfig
from pipeline.manifest import RunRecord
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


def embed_images(
    *, input: str, output: str, address: str | None = None, **options: Any
) -> RunRecord:
    """Embed every image under ``input`` into ``output``: ``embed-images run`` as one call.

    It starts a local Ray, or joins ``address`` (or ``RAY_ADDRESS``), or uses the Ray this
    process already runs, exactly as the command does.

    Args:
        input: Folder or prefix of images (local path, ``file://``, ``s3://``, any fsspec URL).
        output: Where the tables and ``_manifest.json`` go.
        address: Ray cluster to join.
        **options: Any other ``EmbedConfig`` field, e.g. ``weights="random"``,
            ``batch_size=256``, ``storage_options={"anon": True}``.

    Returns:
        The committed run's record: ``run.counts.embedded``, ``run.failures``, ….

    Raises:
        PipelineError: what the command would print as its one line (``ConfigError`` for a
            bad or unknown option, ``ErrorRateExceededError`` for too many bad images).

    Example:
        >>> from pipeline import embed_images
        >>> run = embed_images(input="photos", output="out", weights="random")  # doctest: +SKIP
        >>> run.counts.embedded  # doctest: +SKIP
        24
    """
    from pipeline.run import execute_run

    fields = {f.name for f in dataclasses.fields(EmbedConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r}: options are EmbedConfig's fields "
            f"({', '.join(sorted(fields - {'input', 'output'}))})"
        )
    config = EmbedConfig(input=input, output=output, **options)
    return execute_run(prepare_and_start_ray(config, address))
