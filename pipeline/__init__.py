"""embed-images: images in object storage -> ResNet50 embeddings in Parquet, on Ray Data.

The modules follow the data path: ``listing`` (with ``incremental``) -> ``decode`` (with
``preprocessing``; ``decode_device`` decodes on the model's GPU) -> ``embed`` (with
``weights``) -> ``write`` -> ``output`` (the commit, and the readers), with ``sink`` running
the last two under Ray Data and ``manifest`` the typed records. ``plan`` wires the stages into
one Ray Data plan, ``run`` puts a run together; ``cli``, ``runtime`` and ``jobs/`` are the edges
that parse flags and start or join Ray.
"""

from pipeline.config import EmbedConfig, PipelineError
from pipeline.output import (
    iter_embeddings,
    read_embeddings,
    read_embeddings_dataset,
    read_manifest,
)
from pipeline.runtime import embed_images

__version__ = "0.1.0"

__all__ = [
    "EmbedConfig",
    "PipelineError",
    "embed_images",
    "iter_embeddings",
    "read_embeddings",
    "read_embeddings_dataset",
    "read_manifest",
    "__version__",
]
