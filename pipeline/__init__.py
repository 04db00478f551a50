"""embed-images: images in object storage -> ResNet50 embeddings in Parquet, on Ray Data.

The modules follow the data path: ``listing`` (or ``inventory``; ``incremental`` keeps what is
new, ``feed`` streams it into the plan) -> ``decode`` (with ``preprocessing``;
``decode_device`` decodes on the model's GPU) -> ``embed`` (with ``weights``) -> ``write`` ->
``commit`` into the ``output``, with ``sink`` running the last two under Ray Data and
``manifest`` the typed records; ``read`` (with ``current``) reads the output. ``plan`` wires
the stages into one Ray Data plan, ``run`` puts a run together; ``cli``, ``runtime`` and
``jobs/`` are the edges that parse flags and start or join Ray.
"""

from pipeline.config import EmbedConfig, PipelineError
from pipeline.read import iter_embeddings, read_embeddings, read_embeddings_dataset, read_manifest
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
