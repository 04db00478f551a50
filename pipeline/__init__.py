"""embed-images: images in object storage -> ResNet50 embeddings in Parquet, on Ray Data.

The modules follow the data path: ``listing`` -> ``decode`` (with ``preprocessing``) ->
``embed`` (with ``weights``) -> ``write`` -> ``manifest``. ``plan`` wires them into one
Ray Data plan; ``cli`` is the edge that parses flags and starts or joins Ray.
"""

from pipeline.config import EmbedConfig, PipelineError
from pipeline.manifest import read_embeddings, read_manifest

__version__ = "0.1.0"

__all__ = ["EmbedConfig", "PipelineError", "read_embeddings", "read_manifest", "__version__"]
