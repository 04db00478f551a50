"""Model weights, resolved once in the driver: ImageNet, a checkpoint path/URL, or seeded random.

The driver loads and checks them (sha256, ResNet50 shape) before any data moves, so a bad
weights file fails the command in seconds; the model actors receive the checked state_dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Mapping
from typing import Any

from pipeline.config import PipelineError
from pipeline.storage import one_line, open_fs, public_url

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
RANDOM = "random"

# Full sha256 of the files torchvision downloads for ``imagenet``, by file name. torchvision
# publishes only the first 8 hex digits (in the name) and does not re-check a cached file.
# The value below is not computed on a machine of this project (none can download the file);
# it is the one that independent public projects pinning this file agree on, it begins with
# torchvision's published prefix, and the file is 102,540,417 bytes.
PUBLISHED_SHA256: dict[str, str] = {
    "resnet50-11ad3fa6.pth": "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
}


class WeightsError(PipelineError):
    """The weights cannot be had or are not what they claim to be."""


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """A checked ResNet50 state_dict and what to record about it.

    Attributes:
        name: ``imagenet:IMAGENET1K_V2``, ``random:seed=N`` or the path/URL given.
        sha256: Full sha256 of the file; for ``random``, of the tensors' bytes in key order.
        state_dict: The tensors, on CPU.
    """

    name: str
    sha256: str
    state_dict: Mapping[str, Any] = dataclasses.field(repr=False)

    def as_numpy(self) -> dict[str, Any]:
        """The tensors as numpy arrays, which Ray ships to actors without pickling copies."""
        return {key: value.numpy() for key, value in self.state_dict.items()}


IMAGENET_NAME = "imagenet:IMAGENET1K_V2"


def weights_name(config: Any) -> str:
    """The name a run records for ``--weights``, known without loading them.

    Example:
        >>> from pipeline.config import EmbedConfig
        >>> weights_name(EmbedConfig(input="a", output="b", weights="random", seed=3))
        'random:seed=3'
    """
    if config.weights == RANDOM:
        return f"random:seed={config.seed}"
    return IMAGENET_NAME if config.weights == IMAGENET else public_url(str(config.weights))


def load_weights(
    source: str,
    *,
    sha256: str | None = None,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> ResolvedWeights:
    """Resolve ``--weights`` to a checked ResNet50 state_dict.

    Args:
        source: ``imagenet``, ``random`` or a local path / fsspec URL of a ``state_dict``.
        sha256: Expected full sha256 of the file (checked before ``torch.load``).
        seed: Seed for ``random``.
        storage_options: fsspec options to read a checkpoint from object storage.

    Returns:
        The checked weights.

    Raises:
        WeightsError: download impossible, file missing, checksum mismatch, or not a
            ResNet50 state_dict.

    Example:
        >>> load_weights("random", seed=0).name
        'random:seed=0'
    """
    if source == RANDOM:
        return _random_weights(seed)
    if source == IMAGENET:
        path = _imagenet_checkpoint()
        data = _read_file(path, {})
        name = IMAGENET_NAME
        prefix = os.path.basename(path).rsplit("-", 1)[-1].split(".")[0]
        digest = hashlib.sha256(data).hexdigest()
        # torchvision names the file after the first hex digits of its sha256.
        if not digest.startswith(prefix):
            raise WeightsError(
                f"cached ImageNet weights {path} do not match their published hash prefix "
                f"{prefix} (sha256 {digest}): delete the file and download again"
            )
        # Every load checks the whole file: against --weights-sha256 when given (an image
        # build may pin its own copy), else against the pinned published hash.
        expected = sha256 or PUBLISHED_SHA256.get(os.path.basename(path))
        if expected is None:
            raise WeightsError(
                f"no full sha256 is pinned for {os.path.basename(path)}: pass --weights-sha256"
            )
        if digest != expected:
            raise WeightsError(
                f"cached ImageNet weights {path} have sha256 {digest}, not the expected "
                f"{expected}: delete the file and download again"
            )
    else:
        data = _read_file(source, storage_options or {})
        name = public_url(source)  # recorded everywhere: no signature or token in it
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise WeightsError(f"weights {source} have sha256 {digest}, not the expected {sha256}")
    state_dict = _torch_load(data, name)
    check_resnet50_state_dict(state_dict, name)
    return ResolvedWeights(name=name, sha256=digest, state_dict=state_dict)


def _random_weights(seed: int) -> ResolvedWeights:
    import torch
    from torchvision.models import resnet50

    logger.warning("using RANDOM ResNet50 weights (seed %d): embeddings carry no meaning", seed)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        state_dict = resnet50(weights=None).state_dict()
    finally:
        torch.random.set_rng_state(generator_state)
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return ResolvedWeights(
        name=f"random:seed={seed}", sha256=digest.hexdigest(), state_dict=state_dict
    )


def _imagenet_checkpoint() -> str:
    """Path of IMAGENET1K_V2 in the torch hub cache, downloading it when missing."""
    import torch
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V2.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    logger.info("downloading ImageNet weights from %s", url)
    try:
        prefix = os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]
        torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=False)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise WeightsError(
            f"cannot download the ImageNet weights ({url}): {one_line(exc)}; "
            f"copy that file to {path}, or pass it with --weights /path/to/{os.path.basename(url)}"
        ) from None
    return path


# What a torch checkpoint starts with: a zip archive (torch.save's format since 1.6) or a
# pickle of protocol 2 or later (the legacy format).
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def sniff_checkpoint(source: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse, in milliseconds and without torch, a weights file that is missing or cannot be
    a torch checkpoint; ``imagenet`` and ``random`` pass. :func:`load_weights` checks the rest.
    """
    if source in (IMAGENET, RANDOM):
        return
    head = _read_file(source, storage_options or {}, size=4)
    if not head.startswith(CHECKPOINT_MAGIC):
        raise WeightsError(
            f"weights {source} are not a torch checkpoint (neither a zip archive nor a "
            "pickle): pass a file written by torch.save(model.state_dict(), path)"
        )


def _read_file(uri: str, storage_options: Mapping[str, Any], *, size: int = -1) -> bytes:
    """The file's first ``size`` bytes (all of it by default); failures as WeightsError."""
    try:
        fs, path = open_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            return bytes(f.read(size))
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {uri}") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read weights {uri}: {one_line(exc)}") from None


def _torch_load(data: bytes, name: str) -> Mapping[str, Any]:
    import pickle
    import struct
    import zipfile

    import torch

    try:
        # weights_only: a checkpoint is data, never code to run.
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        struct.error,
        zipfile.BadZipFile,
    ) as exc:  # what torch.load raises on bytes that are not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"weights {name} are not a loadable torch state_dict: {first}") from None
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"weights {name} hold a {type(loaded).__name__}, not a state_dict")
    return loaded


def check_resnet50_state_dict(state_dict: Mapping[str, Any], name: str) -> None:
    """Refuse anything that does not load into torchvision's ``resnet50`` key for key.

    The classifier (``fc.*``) may be absent: it is replaced by identity anyway.
    """
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    try:
        incompatible = model.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise WeightsError(
            f"weights {name} are not a ResNet50 state_dict: {detail[:200]}"
        ) from None
    missing = [k for k in incompatible.missing_keys if not k.startswith("fc.")]
    if missing or incompatible.unexpected_keys:
        shown = (missing + list(incompatible.unexpected_keys))[:3]
        raise WeightsError(
            f"weights {name} are not a ResNet50 state_dict: {len(missing)} missing and "
            f"{len(incompatible.unexpected_keys)} unexpected keys (e.g. {', '.join(shown)})"
        )
