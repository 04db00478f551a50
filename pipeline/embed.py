"""Stage 3 (actor pool): ResNet50 with ``fc`` = identity -> 2048-d pooled features.

One model per actor, loaded in ``__init__``; ``__call__`` runs under ``torch.inference_mode``.
The same class runs on GPU actors (optional fp16/bf16 autocast) and on CPU actors (fp32). An
actor may run several calls at once (``concurrent_calls``), each in a thread of its own with its
own pinned buffer and CUDA stream, over the one model.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ConfigError, Precision

if TYPE_CHECKING:
    import torch

    from pipeline.preprocessing import PreprocessSpec

EMBEDDING_DIM = 2048


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What made a table's vectors; the manifest and every Parquet file record the same one.

    Example:
        >>> ModelIdentity(weights="random:seed=0", weights_sha256="ab" * 32,
        ...               normalized=False, precision="fp32").to_parquet_metadata()["model"]
        'resnet50'
    """

    weights: str
    weights_sha256: str
    normalized: bool
    precision: Precision
    name: str = "resnet50"
    embedding_dim: int = EMBEDDING_DIM
    embedding_dtype: str = "float32"

    # What makes two tables' vectors comparable (precision alone does not change the model).
    COMPARED = ("weights_sha256", "normalized", "embedding_dim")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "embedding_dim": self.embedding_dim,
            "embedding_dtype": self.embedding_dtype,
            "normalized": self.normalized,
            "precision": self.precision,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            name=str(data.get("name", "resnet50")),
            weights=str(data["weights"]),
            weights_sha256=str(data["weights_sha256"]),
            embedding_dim=int(data.get("embedding_dim", EMBEDDING_DIM)),
            embedding_dtype=str(data.get("embedding_dtype", "float32")),
            normalized=bool(data.get("normalized", False)),
            precision=data.get("precision", "fp32"),
        )

    def to_parquet_metadata(self) -> dict[str, str]:
        """Parquet key-value metadata (strings only)."""
        return {
            "model": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "embedding_dim": str(self.embedding_dim),
            "embedding_dtype": self.embedding_dtype,
            "normalized": json.dumps(self.normalized),
            "precision": self.precision,
        }

    def first_difference(self, other: ModelIdentity) -> tuple[str, Any, Any] | None:
        """``(key, ours, theirs)`` for the first compared key that differs, else ``None``."""
        for key in self.COMPARED:
            if getattr(self, key) != getattr(other, key):
                return key, getattr(self, key), getattr(other, key)
        return None


# The environment of a CPU model actor's process (glibc reads it at start): one malloc arena.
# glibc gives a thread its own arena, and an arena other than the main one serves each block
# over 64 MiB with a fresh mmap whatever the threshold below. Ray Data calls the model from a
# worker thread, so without this every forward pass page-faults its activations in again
# (bench/RESULTS.md has the figures).
CPU_ACTOR_ENV = {"MALLOC_ARENA_MAX": "1"}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, Linux's cpu flags).

    Elsewhere oneDNN emulates bf16, slower than fp32, so a CPU model refuses it there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def keep_freed_memory() -> None:
    """Keep the forward pass's large buffers in the heap between batches (glibc only).

    glibc serves each allocation over its dynamic mmap threshold with a fresh ``mmap`` and
    unmaps it on ``free``, so every CPU forward pass page-faults its activations in again and
    spends much of its time in the kernel. A fixed 1 GiB mmap threshold and a trim threshold
    that never trims make the buffers reusable, for some more resident memory (the figures
    are in bench/RESULTS.md). This holds for the main arena; a process that runs the model
    from other threads also needs ``CPU_ACTOR_ENV``.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
    libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))


def check_cpu_precision(precision: Precision) -> None:
    """Refuse, on a CPU actor, a precision it cannot compute in. The precision is decided once,
    in the driver, and written into the output's metadata: computing in another one here would
    make the files lie."""
    if precision == "fp32":
        return
    if precision != "bf16":
        raise ConfigError(
            f"--precision {precision} needs a CUDA device, and torch sees none on this "
            "actor's node: use --precision bf16 (on CPUs with AVX512-BF16 or AMX) or fp32"
        )
    if not cpu_has_bf16():
        raise ConfigError(
            "--precision bf16 on CPU needs AVX512-BF16 or AMX-BF16, and this actor's CPU "
            "has neither (see the flags in /proc/cpuinfo): use --precision fp32"
        )


def build_model(state_dict: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """ResNet50 with ``fc`` = identity and these weights, in eval mode, channels_last, on
    ``device``."""
    import torch
    from torchvision.models import resnet50

    # Built on the meta device: no time spent on a random init the weights overwrite.
    with torch.device("meta"):
        model = resnet50(weights=None)
    model.fc = torch.nn.Identity()
    weights = {
        # numpy arrays come zero-copy, read-only, from Ray's object store: copy them.
        key: torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value
        for key, value in state_dict.items()
        if not key.startswith("fc.")
    }
    # strict: every other key is there (checked upstream); assign: no meta tensor remains.
    model.load_state_dict(weights, strict=True, assign=True)
    # channels_last lets cuDNN (and oneDNN on CPU) pick their fastest convolution kernels.
    return model.eval().to(device, memory_format=torch.channels_last)


class ResNet50Embedder:
    """Embed the decoded images of a batch (a Ray Data ``map_batches`` callable class).

    Args:
        state_dict: ResNet50 weights (tensors or numpy arrays, ``fc.*`` optional), checked
            by :func:`pipeline.weights.load_weights`.
        mean: Per-channel normalization mean (0..1 scale).
        std: Per-channel normalization std.
        precision: Autocast dtype: fp16 or bf16 on CUDA, bf16 on a CPU with AVX512-BF16 or
            AMX (refused on other CPUs, as is fp16 on any CPU).
        normalize: L2-normalize each embedding.
        num_threads: torch intra-op threads (``None``: every core the process may use, on
            CPU; torch's own setting on GPU).
        device: ``"cuda"``, ``"cpu"`` or ``None`` for CUDA when torch sees it.
        compile: Wrap the model in ``torch.compile``, compiled on the first batch; shorter
            batches are padded to ``batch_hint`` rows.
        batch_hint: The usual batch size: the rows the pinned host buffer of a GPU model is
            first sized for, and those a compiled model is compiled for.
        decode_spec: Batches carry file bytes (``data``, from ``fetch_batch``) to decode on
            this model's device with this spec, instead of decoded pixels (``image``).
            Refused where torch sees no CUDA, unless ``device`` is given.
        max_image_pixels: The header pixel limit of the images decoded here.
        concurrent_calls: Calls that may run at once, from as many threads (Ray Data's
            ``max_concurrent_calls_per_actor``). Above 1, each thread gets its own pinned
            buffer and, on CUDA, its own stream, so one call's copy or decode overlaps
            another's forward pass; a compiled model compiles on one thread only.

    Example:
        >>> weights = load_weights("random")  # doctest: +SKIP
        >>> spec = preprocess_spec("center-crop")  # doctest: +SKIP
        >>> embedder = ResNet50Embedder(
        ...     state_dict=weights.state_dict, mean=spec.mean, std=spec.std)  # doctest: +SKIP
        >>> embedder.embed(np.zeros((2, 224, 224, 3), np.uint8)).shape  # doctest: +SKIP
        (2, 2048)
    """

    def __init__(
        self,
        *,
        state_dict: Mapping[str, Any],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        precision: Precision = "fp32",
        normalize: bool = False,
        num_threads: int | None = None,
        device: str | None = None,
        compile: bool = False,
        batch_hint: int = 0,
        decode_spec: PreprocessSpec | None = None,
        max_image_pixels: int = 0,
        concurrent_calls: int = 1,
    ) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if decode_spec is not None and device is None and self.device.type != "cuda":
            raise ConfigError(
                "--decode-device cuda needs a CUDA device, and torch sees none on this actor's "
                "node: use --decode-device cpu"
            )
        self.decode_spec = decode_spec
        self.max_image_pixels = max_image_pixels
        if num_threads is None and self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1), which leaves a CPU
            # node's other cores idle while decode tasks need only a sliver of them: use every
            # core this process may run on. With several CPU actors per node, pass
            # --model-threads cores/actors instead.
            num_threads = len(os.sched_getaffinity(0))
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if self.device.type == "cpu":
            check_cpu_precision(precision)
            keep_freed_memory()
        self.precision: Precision = precision
        self.normalize = normalize
        self.model: Any = build_model(state_dict, self.device)
        if self.device.type == "cuda":
            # Fixed input shapes: let cuDNN time its algorithms once per shape and keep the best.
            torch.backends.cudnn.benchmark = True
        self.compiled = compile
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
        self.batch_hint = batch_hint
        # Per calling thread: its pinned host buffer and, with concurrent calls, CUDA stream.
        self._local = threading.local()
        self.concurrent_calls = concurrent_calls
        self._first_call = threading.Lock()
        self._warm = not compile
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if self.device.type == "cuda" and concurrent_calls > 1:
            # The weights were copied on the default stream; the calls' own streams do not
            # wait for it.
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _own_stream(self) -> Iterator[None]:
        """Run the block on this thread's own CUDA stream, when calls run concurrently.

        Each call ends by copying its features to the host, which waits for its stream only:
        another thread's forward pass may go on meanwhile.
        """
        if self.device.type != "cuda" or self.concurrent_calls == 1:
            yield
            return
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            yield

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` pixels on the host -> float32 ``(N, 2048)`` features."""
        import torch

        with torch.inference_mode(), self._own_stream():
            # np.require copies only when needed: torch wants a C-contiguous, writable array.
            x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
            if self.device.type == "cuda":
                x = self._to_device(x)
            # uint8 travels; the float conversion and normalization happen on the device.
            return self.embed_on_device(x.permute(0, 3, 1, 2))

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Copy a host batch to the GPU through a pinned buffer allocated once (per calling
        thread) and reused.

        Pinned memory makes the copy asynchronous; ``embed_on_device`` ends in a copy back to
        the host, which waits for the stream, so the buffer is free again by the thread's next
        call.
        """
        import torch

        n, shape = x.shape[0], tuple(x.shape[1:])
        pinned = getattr(self._local, "pinned", None)
        if pinned is None or pinned.shape[0] < n or pinned.shape[1:] != shape:
            rows = max(n, self.batch_hint)
            pinned = self._local.pinned = torch.empty((rows, *shape), dtype=x.dtype).pin_memory()
        staging = pinned[:n]
        staging.copy_(x)
        return staging.to(self.device, non_blocking=True)

    def embed_on_device(self, x: torch.Tensor) -> np.ndarray:
        """uint8 ``(N, 3, H, W)`` pixels on the model's device -> float32 ``(N, 2048)``."""
        return self.features_on_device(x).cpu().numpy()

    def features_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`embed_on_device`, but the features stay on the device and nothing waits
        for it: the host may prepare the next batch while this one runs."""
        import torch

        with torch.inference_mode():
            n = x.shape[0]
            if self.compiled and 0 < n < self.batch_hint:
                # A compiled model is specialised to its input shape: pad a short batch (the
                # last of a block) to the usual size rather than compile again for it.
                x = torch.cat([x, x.new_zeros((self.batch_hint - n, *x.shape[1:]))])
            x = x.float().div_(255.0)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            if self._warm:
                features = self._forward(x)
            else:
                # torch.compile compiles on the first call: one thread compiles, the others
                # wait for it and then run what it compiled.
                with self._first_call:
                    features = self._forward(x)
                    self._warm = True
            features = features[:n].float()
            if self.normalize:
                features = torch.nn.functional.normalize(features, dim=1)
            return features

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return self.model(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_spec is not None:
            return self._decode_and_embed(batch)
        ok = to_embed(batch)
        embeddings = np.zeros((len(ok), EMBEDDING_DIM), dtype=np.float32)
        if ok.any():
            embeddings[ok] = self.embed(batch["image"][ok])
        out = {key: value for key, value in batch.items() if key != "image"}
        out["embedding"] = embeddings
        return out

    def _decode_and_embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A ``fetch_batch`` batch -> the columns ``decode_batch`` + ``__call__`` give."""
        from pipeline.decode_device import decode_on_device

        assert self.decode_spec is not None
        n = len(batch["uri"])
        error_type = np.asarray(batch["error_type"], dtype=object).copy()
        error_message = np.asarray(batch["error_message"], dtype=object).copy()
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        formats = np.asarray([""] * n, dtype=object)
        embeddings = np.zeros((n, EMBEDDING_DIM), dtype=np.float32)
        read = np.flatnonzero(to_embed(batch))
        if len(read):
            with self._own_stream():
                decoded = decode_on_device(
                    [bytes(batch["data"][i]) for i in read],
                    self.decode_spec,
                    max_image_pixels=self.max_image_pixels,
                    device=self.device,
                )
                features = self.embed_on_device(decoded.pixels)
            ok = np.asarray([e == "" for e in decoded.error_type], dtype=bool)
            embeddings[read[ok]] = features[ok]
            widths[read], heights[read] = decoded.original_width, decoded.original_height
            formats[read] = decoded.format
            error_type[read] = decoded.error_type
            error_message[read] = decoded.error_message
        return {
            "uri": batch["uri"],
            "file_size": batch["file_size"],
            "source_version": batch["source_version"],
            "original_width": widths,
            "original_height": heights,
            "format": formats,
            "error_type": error_type,
            "error_message": error_message,
            "embedding": embeddings,
            **{key: batch[key] for key in ("content_sha256", "reuse") if key in batch},
        }


def to_embed(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The rows the model runs on: read without error, and not found in the table by their
    content (``reuse``, :mod:`pipeline.reuse`: the writer copies their stored vectors)."""
    ok = np.asarray(batch["error_type"] == "", dtype=bool)
    if "reuse" in batch:
        ok &= np.asarray(batch["reuse"], dtype=np.int64) < 0
    return ok
