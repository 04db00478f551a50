"""One frozen object carries every knob of a run; it is built and validated once, at the edge."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

ResizeMode = Literal["center-crop", "squash", "letterbox"]
Precision = Literal["fp32", "fp16", "bf16"]
DecodeDevice = Literal["cpu", "cuda"]
Compile = Literal["auto", "on", "off"]

RESIZE_MODES: tuple[str, ...] = ("center-crop", "squash", "letterbox")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
DECODE_DEVICES: tuple[str, ...] = ("cpu", "cuda")
COMPILE_MODES: tuple[str, ...] = ("auto", "on", "off")
# Images per model forward when --batch-size is not given. On a GPU the forward pass is
# faster with bigger batches up to 512 (bench/RESULTS.md, "GPU bench"); 256 keeps a block's
# memory moderate. On CPU, 16-32 is the measured best.
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 32

# Pillow's own default (Image.MAX_IMAGE_PIXELS): about 89.5 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class PipelineError(Exception):
    """A failure the user can fix; the command line prints it as one line and exits non-zero."""


class NotRetryableError(PipelineError):
    """A failure that running again unchanged cannot fix (a missing input, an output inside the
    input, a bad manifest, another model in the output): the commands exit 2, so that a
    scheduler does not retry it."""


class ConfigError(NotRetryableError, ValueError):
    """A knob has a value the pipeline cannot run with."""


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything one run needs to know.

    Args:
        input: Folder or prefix to embed: a local path, ``file://``, ``s3://`` or any fsspec URL.
        output: Where the Parquet tables and ``_manifest.json`` go (same kinds of URI).
        weights: ``imagenet``, ``random`` or a path/URL of a ResNet50 ``state_dict``.
        weights_sha256: Expected sha256 of the weights file, checked before loading.
        seed: Seed of the ``random`` weights.
        resize: ``center-crop`` (the weights' own transform), ``squash`` or ``letterbox``.
        jpeg_draft: Let libjpeg downscale in the DCT domain (``Image.draft``) before the exact
            resize. Faster on large JPEGs; pixels differ slightly, so it is off by default.
        batch_size: Images per model forward (``None``: 256 on GPU actors, 32 on CPU).
        decode_batch_size: Images per decode task. Each task costs Ray Data a fixed time, so
            small tasks make the plan's per-image cost: 16 a task gave 137 rows/s on zero-byte
            files, 256 a task 3,231 (``bench.overhead``). A task reads its files
            ``decode.FETCH_BYTES`` at a time, so large files do not make it hold more.
        decode_device: ``cpu``: decode tasks send pixels to the model actors; ``cuda``: they
            send the files' bytes, and the GPU model actors decode JPEGs with nvJPEG (other
            files, and JPEGs it should not take, on the actor's CPU, one at a time). A block then
            holds its files' bytes: for large files, lower ``decode_batch_size``.
        compile: ``torch.compile`` the model: ``auto`` does on GPU actors (measured 1.5x the
            eager forward on an H200) and not on CPU actors.
        decode_memory: Bytes of RAM reserved per decode task.
        decode_cpus: Logical CPUs reserved per decode task; fractions let more decode tasks
            share a core, for a node that also runs model actors.
        write_cpus: Logical CPUs reserved per writer task.
        rows_per_file: Rows per Parquet file written.
        commit_every: Images (embedded or failed) written between checkpoint commits: a run
            killed between checkpoints keeps the earlier ones, and the next run embeds the
            rest.
        commit_interval: Seconds after which what is written is committed, at the latest.
        input_list: Take the input's files from this list instead of listing ``input``: an
            S3 Inventory ``manifest.json``, or a Parquet, CSV or text file of URIs (entries
            outside ``input`` are ignored).
        list_concurrency: LIST requests in flight at once on an object store (a prefix is
            split by its "subfolders"; see ``pipeline.listing.ShardedLister``).
        concurrency: Model actors: a fixed count or an autoscaling ``(min, max)``.
        calls_per_actor: Batches each model actor works on at once, each in a thread (and,
            on GPU, a CUDA stream) of its own: one batch is copied to or decoded on the GPU
            while another's forward pass runs. Ray Data's
            ``max_concurrent_calls_per_actor`` with ``enable_true_multi_threading``. Leave 1
            on CPU actors, whose one forward pass already uses every core.
        num_gpus: GPUs per model actor; ``None`` means 1 where the cluster has GPUs, else 0.
        model_threads: torch intra-op threads per CPU model actor (``None``: every core of
            the node; with several CPU actors per node, give cores / actors).
        model_cpus: Logical CPUs each CPU model actor reserves. One by default: its threads
            use the node's cores anyway, and the node's other CPUs stay free for decode and
            writer tasks. Several actors on a small node need less each (e.g. two actors of
            one thread on 2 cores: 0.5), or nothing is left to decode on.
        precision: Autocast dtype. GPU actors: fp16 or bf16. CPU actors: bf16 on CPUs with
            AVX512-BF16 or AMX (refused on others); fp16 is computed, and recorded, as fp32.
        normalize: L2-normalize each embedding.
        limit: Embed at most this many listed images.
        full: Re-embed everything, replacing what the output holds (default: only images that
            are new or changed since the committed runs).
        max_error_rate: Fraction of failed images above which the run commits only its
            errors table and fails. The verdict is the run's, on its totals: its failures
            plus those earlier verdicts refused, over its images plus those; failures an
            earlier run accepted never count again.
        cleanup_retention: Seconds a file no manifest lists must have existed before the
            clean-up at a run's start deletes it (the staging of live runs is never touched).
        max_image_pixels: Images whose header claims more pixels are refused as bombs.
        storage_options: fsspec options for both input and output (never logged).
        endpoint_url: S3 endpoint override; ``None`` leaves it to the AWS chain.
        object_store_memory: Bytes of Ray's object store when the command starts its own
            local Ray (``None``: Ray's default, 30% of RAM); a cluster sets its own at
            ``ray start``.

    Example:
        >>> EmbedConfig(input="./photos", output="./out", weights="random").resize
        'center-crop'
    """

    input: str
    output: str
    weights: str = "imagenet"
    weights_sha256: str | None = None
    seed: int = 0
    resize: ResizeMode = "center-crop"
    jpeg_draft: bool = False
    batch_size: int | None = None
    decode_batch_size: int = 256
    decode_device: DecodeDevice = "cpu"
    compile: Compile = "auto"
    decode_memory: int = 512 * 1024 * 1024
    decode_cpus: float = 1.0
    write_cpus: float = 1.0
    rows_per_file: int = 4096
    commit_every: int = 100_000
    commit_interval: float = 1800.0
    list_concurrency: int = 16
    input_list: str | None = None
    concurrency: int | tuple[int, int] = 1
    calls_per_actor: int = 1
    num_gpus: float | None = None
    model_threads: int | None = None
    model_cpus: float = 1.0
    precision: Precision = "fp32"
    normalize: bool = False
    limit: int | None = None
    full: bool = False
    max_error_rate: float = 0.1
    cleanup_retention: float = 3600.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    endpoint_url: str | None = None
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is empty: give a folder or an s3:// prefix")
        if not self.output:
            raise ConfigError("--output is empty: give a folder or an s3:// prefix")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize {self.resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if self.decode_device not in DECODE_DEVICES:
            raise ConfigError(
                f"--decode-device {self.decode_device!r}: choose one of {', '.join(DECODE_DEVICES)}"
            )
        if self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"--compile {self.compile!r}: choose one of {', '.join(COMPILE_MODES)}"
            )
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ConfigError(f"--batch-size {self.batch_size!r}: must be an integer >= 1")
        for name in (
            "decode_batch_size",
            "decode_memory",
            "rows_per_file",
            "commit_every",
            "list_concurrency",
            "calls_per_actor",
            "max_image_pixels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit}: must be >= 1")
        if not self.cleanup_retention >= 0:
            raise ConfigError(f"--cleanup-retention {self.cleanup_retention}: must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate {self.max_error_rate}: must be between 0 and 1")
        if self.model_threads is not None and self.model_threads < 1:
            raise ConfigError(f"--model-threads {self.model_threads}: must be >= 1")
        for name in ("decode_cpus", "write_cpus", "model_cpus", "commit_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if self.object_store_memory is not None and self.object_store_memory < 78 * 2**20:
            raise ConfigError(
                f"--object-store-memory {self.object_store_memory}: Ray needs at least 78 MiB"
            )
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"--num-gpus {self.num_gpus}: must be >= 0")
        _check_concurrency(self.concurrency)
        if self.weights_sha256 is not None and not re.fullmatch(
            r"[0-9a-f]{64}", self.weights_sha256
        ):
            raise ConfigError(
                "--weights-sha256 must be the full 64-hex-digit sha256 (lower case) of the file"
            )
        if self.weights_sha256 is not None and self.weights == "random":
            raise ConfigError("--weights-sha256 applies to a weights file or imagenet, not random")

    def model_batch_size(self, num_gpus: float) -> int:
        """Images per model forward: ``batch_size``, else the default for the actors' device."""
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH_SIZE if num_gpus > 0 else CPU_BATCH_SIZE

    def compiles(self, num_gpus: float) -> bool:
        """Whether the model actors ``torch.compile`` their model."""
        return self.compile == "on" or (self.compile == "auto" and num_gpus > 0)

    def fs_options(self) -> dict[str, Any]:
        """The fsspec options for S3-like stores: ``storage_options`` plus the endpoint."""
        options = dict(self.storage_options)
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        return options


def _check_concurrency(value: int | tuple[int, int]) -> None:
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"--concurrency {value}: must be >= 1")
        return
    if len(value) != 2 or not 1 <= value[0] <= value[1]:
        raise ConfigError(f"--concurrency {value}: give N or MIN,MAX with 1 <= MIN <= MAX")


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """Parse ``N`` or ``MIN,MAX`` as given on the command line.

    Example:
        >>> parse_concurrency("1,4")
        (1, 4)
    """
    parts = text.split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--concurrency {text!r}: give N or MIN,MAX (integers)") from None
    if len(numbers) == 1:
        value: int | tuple[int, int] = numbers[0]
    elif len(numbers) == 2:
        value = (numbers[0], numbers[1])
    else:
        raise ConfigError(f"--concurrency {text!r}: give N or MIN,MAX")
    _check_concurrency(value)
    return value
