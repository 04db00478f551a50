"""One frozen object carries every knob of a run; it is built and validated once, at the edge."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pipeline.values import check_concurrency, parse_byte_size, parse_concurrency, parse_json_object

ResizeMode = Literal["center-crop", "squash", "letterbox"]
Precision = Literal["fp32", "fp16", "bf16"]
DecodeDevice = Literal["cpu", "cuda"]
Compile = Literal["auto", "on", "off"]
Gate = Literal["on", "off"]
Reuse = Literal["etag", "sha256", "off"]

RESIZE_MODES: tuple[str, ...] = ("center-crop", "squash", "letterbox")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
DECODE_DEVICES: tuple[str, ...] = ("cpu", "cuda")
COMPILE_MODES: tuple[str, ...] = ("auto", "on", "off")
GATES: tuple[str, ...] = ("on", "off")
REUSE_MODES: tuple[str, ...] = ("etag", "sha256", "off")
# The command's name, in every line it prints.
PROG = "embed-images"
# Exit statuses of every entry point (embed-images, jobs/*).
EXIT_FAILED = 1  # the run failed and committed nothing; retrying may help
EXIT_USAGE = 2  # the command line is wrong; retrying will not help
EXIT_BAD_DATA = 3  # too many images failed (--max-error-rate); errors/ says which
EXIT_QUALITY_GATE = 4  # the quality gate refused the run's vectors (non-finite values)
# Nodes were lost and the model stage stalled: drained, checkpoints kept; retry once the
# cluster can hold the model stage again (sysexits' EX_TEMPFAIL).
EXIT_STALLED = 75
# Images per model forward when --batch-size is not given. A GPU forward pass gains from
# bigger batches, and 256 keeps a block's memory moderate; a CPU gains nothing past a few
# dozen (bench/RESULTS.md has both series).
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


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    details: str = "",
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """An ``EmbedConfig`` field and its flag, declared once (as ``HfArgumentParser`` reads a
    dataclass): the flag is the field's name with dashes, its type and choices come from the
    annotation, and :mod:`pipeline.options` builds the parser, the TOML keys and
    ``docs/options.md`` from this.

    Args:
        default: The field's default, which the flag takes.
        help: One or two lines for ``--help``; ``%(default)s`` names the default.
        group: The ``--help`` section: ``input and output``, ``model``, ``performance`` or
            ``cluster, storage and logs``.
        metavar: The value's name in ``--help``.
        parse: Turns the flag's text (or a TOML string) into the value, raising
            ``ValueError`` with what is wrong.
        details: More for ``docs/options.md`` than ``--help`` holds.
        default_factory: For a mutable default.
    """
    metadata = {"help": help, "group": group, "metavar": metavar, "parse": parse}
    metadata["details"] = details
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, repr=False)
    return dataclasses.field(default=default, metadata=metadata)


IO, MODEL, SPEED, CLUSTER = "input and output", "model", "performance", "cluster, storage and logs"


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything one run needs to know: each field is a flag of ``embed-images run`` and a
    key of its ``--config`` file, documented where it is declared (``docs/options.md`` lists
    them all).

    Example:
        >>> EmbedConfig(input="./photos", output="./out", weights="random").resize
        'center-crop'
    """

    input: str = option(
        help="folder or prefix of images: local path, file://, s3://, any fsspec URL (required)",
        group=IO,
        metavar="URI",
    )
    output: str = option(
        help="where embeddings/, errors/ and _manifest.json go (required)",
        group=IO,
        metavar="URI",
    )
    limit: int | None = option(None, help="embed at most N listed images", group=IO, metavar="N")
    full: bool = option(
        False,
        help="re-embed everything, replacing the output's tables (default: only images new or "
        "changed since the committed runs)",
        group=IO,
    )
    max_error_rate: float = option(
        0.1,
        help="fail (committing only errors/) when more than this fraction of images fail "
        "(default %(default)s)",
        group=IO,
        metavar="F",
        details="The verdict is the run's, on its totals: its failures plus those earlier "
        "verdicts refused, over its images plus those; failures an earlier run accepted never "
        "count again.",
    )
    cleanup_retention: float = option(
        3600.0,
        help="the clean-up at a run's start deletes files no manifest lists only once they "
        "are this old (default %(default)s); live runs' files are never touched",
        group=IO,
        metavar="SECONDS",
    )
    max_image_pixels: int = option(
        DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse images whose header claims more pixels (default: Pillow's, %(default)s)",
        group=IO,
        metavar="N",
    )
    rows_per_file: int = option(
        4096,
        help="rows per Parquet file: model batches are bundled up to at least N rows a file "
        "(default %(default)s)",
        group=IO,
        metavar="N",
    )
    reuse: Reuse = option(
        "etag",
        help="an image whose bytes the table holds already copies their stored vector: etag: "
        "found by a single-part ETag without a read, else by the sha256 of its bytes; "
        "sha256: by the sha256 only; off: embed every new image (default %(default)s)",
        group=IO,
        details="Moved, renamed and copied images then cost a read (or nothing), not a forward "
        "pass. Only the table's current files are looked in, and never by a --full run. A "
        "single-part upload's ETag is the MD5 of its bytes: 'sha256' does not trust MD5 where "
        "others may write the input.",
    )
    input_list: str | None = option(
        None,
        help="take the images from a list instead of listing --input: an S3 Inventory "
        "manifest.json, or a Parquet/CSV file with a 'uri' column (optional 'size', "
        "'version'), or a text file of one URI per line; entries outside --input are ignored",
        group=IO,
        metavar="URI",
    )
    commit_every: int = option(
        100_000,
        help="commit a checkpoint every N images written: a run stopped mid-way keeps its "
        "checkpoints, and the next run embeds only the rest (default %(default)s)",
        group=IO,
        metavar="N",
    )
    commit_interval: float = option(
        1800.0,
        help="commit what is written at least this often (default %(default)s)",
        group=IO,
        metavar="SECONDS",
    )
    drain_seconds: float = option(
        25.0,
        help="on SIGTERM, stop feeding images and commit what the writers finish within this "
        "many seconds as a checkpoint, then exit 143; 0: stop at once (default %(default)s)",
        group=IO,
        metavar="SECONDS",
        details="Under Kubernetes keep it below the pod's termination grace period (30 s by "
        "default), so that the commit ends before the SIGKILL. A second signal stops at once.",
    )
    lost_node_wait: float = option(
        300.0,
        help="after a Ray node is lost, drain and exit 75 when the model stage finishes no "
        "batch for this many seconds (default %(default)s)",
        group=CLUSTER,
        metavar="SECONDS",
        details="Ray restarts a lost node's model actors elsewhere when there is room; an "
        "autoscaler may add a node meanwhile. The drain keeps what was written (--drain-seconds).",
    )
    list_concurrency: int = option(
        16,
        help="LIST requests in flight at once on an object store: the input prefix is split "
        "by its subfolders and listed in parallel (default %(default)s)",
        group=IO,
        metavar="N",
    )
    weights: str = option(
        "imagenet",
        help="ResNet50 weights (default: imagenet = torchvision IMAGENET1K_V2)",
        group=MODEL,
        metavar="imagenet|random|PATH_OR_URL",
    )
    weights_sha256: str | None = option(
        None,
        help="expected sha256 of the weights file, checked before loading",
        group=MODEL,
        metavar="HEX",
        parse=str.lower,
    )
    seed: int = option(0, help="seed of --weights random (default %(default)s)", group=MODEL)
    resize: ResizeMode = option(
        "center-crop",
        help="center-crop: the weights' own transform (default); squash; letterbox",
        group=MODEL,
    )
    jpeg_draft: bool = option(
        False,
        help="let libjpeg downscale before the exact resize (faster, pixels differ)",
        group=MODEL,
    )
    precision: Precision = option(
        "fp32",
        help="autocast dtype (default %(default)s): fp16 or bf16 on GPU; bf16 on CPUs with "
        "AVX512-BF16 or AMX, refused on others; CPU actors compute fp16 as fp32 and record it",
        group=MODEL,
    )
    normalize: bool = option(False, help="L2-normalize each embedding", group=MODEL)
    gate: Gate = option(
        "on",
        help="on: a vector with a NaN or an infinity stops the run before it is committed "
        "(exit 4); off: commit it and count it (default %(default)s)",
        group=MODEL,
        details="Each run records its vectors' statistics either way (non-finite and all-zero "
        "counts, L2 norm percentiles) in its manifest record, summary and report.",
    )
    probe: int = option(
        32,
        help="re-embed N images the table holds, picked across its runs, and compare them with "
        "their stored vectors before committing anything; 0: no probe (default %(default)s)",
        group=MODEL,
        metavar="N",
        details="A probe beyond --probe-tolerance stops the run (exit 4) unless --gate off; it "
        "catches what the weights' sha256 cannot: a changed resize, another GPU's numerics, a "
        "corrupted model.",
    )
    probe_tolerance: float | None = option(
        None,
        help="the relative L2 error |new - stored| / |stored| a probe may show (default: 0.001 "
        "for fp32 vectors, 0.01 for bf16 and fp16)",
        group=MODEL,
        metavar="E",
    )
    batch_size: int | None = option(
        None,
        help=f"images per model forward (default {GPU_BATCH_SIZE} on GPU actors, "
        f"{CPU_BATCH_SIZE} on CPU)",
        group=SPEED,
        metavar="N",
    )
    decode_device: DecodeDevice = option(
        "cpu",
        help="cpu: decode tasks send pixels to the model; cuda: they send the files' bytes and "
        "GPU model actors decode JPEGs with nvJPEG (default %(default)s)",
        group=SPEED,
        details="With cuda, other files, and JPEGs nvJPEG should not take, are decoded on the "
        "actor's CPU, one at a time. A block then holds its files' bytes: for large files, "
        "lower --decode-batch-size.",
    )
    compile: Compile = option(
        "auto",
        help="torch.compile the model; auto: on GPU actors only (default %(default)s)",
        group=SPEED,
    )
    concurrency: int | tuple[int, int] = option(
        1,
        help="model actors: fixed N or autoscaling MIN,MAX (default %(default)s)",
        group=SPEED,
        metavar="N|MIN,MAX",
        parse=parse_concurrency,
    )
    calls_per_actor: int = option(
        1,
        help="batches each model actor works on at once, a thread and CUDA stream each, so "
        "copies and GPU decode overlap forward passes; 1 on CPU actors (default %(default)s)",
        group=SPEED,
        metavar="N",
        details="Ray Data's max_concurrent_calls_per_actor with enable_true_multi_threading. "
        "Leave 1 on CPU actors, whose one forward pass already uses every core.",
    )
    num_gpus: float | None = option(
        None,
        help="GPUs per model actor, fractions allowed (default 1 if the cluster has GPUs, else 0)",
        group=SPEED,
        metavar="F",
    )
    model_threads: int | None = option(
        None,
        help="torch threads per CPU model actor (default: all cores; cores/actors if several "
        "share a node)",
        group=SPEED,
        metavar="N",
    )
    model_cpus: float = option(
        1.0,
        help="CPUs reserved per CPU model actor, fractions allowed; the rest decode and write "
        "(default %(default)s)",
        group=SPEED,
        metavar="F",
        details="Several actors on a small node need less each (e.g. two actors of one thread "
        "on 2 cores: 0.5), or nothing is left to decode on; such a plan is refused.",
    )
    decode_batch_size: int = option(
        256,
        help="images per decode task batch (default %(default)s)",
        group=SPEED,
        metavar="N",
        details="Each task costs Ray Data a fixed time, so small tasks make the plan's "
        "per-image cost. A task reads its files a bounded number of bytes at a time, so "
        "large files do not make it hold more.",
    )
    decode_cpus: float = option(
        1.0,
        help="CPUs reserved per decode task, fractions allowed (default %(default)s)",
        group=SPEED,
        metavar="F",
    )
    decode_memory: int = option(
        512 * 1024 * 1024,
        help="RAM reserved per decode task, e.g. 1GiB (default %(default)s bytes)",
        group=SPEED,
        metavar="BYTES",
        parse=parse_byte_size,
    )
    write_cpus: float = option(
        1.0,
        help="CPUs reserved per writer task, fractions allowed (default %(default)s)",
        group=SPEED,
        metavar="F",
    )
    object_store_memory: int | None = option(
        None,
        help="object store size when this command starts a local Ray, e.g. 2GiB (default: "
        "Ray's, 30%% of RAM; a cluster sets its own)",
        group=CLUSTER,
        metavar="BYTES",
        parse=parse_byte_size,
    )
    endpoint_url: str | None = option(
        None,
        help="S3 endpoint (default: AWS_ENDPOINT_URL or the AWS chain)",
        group=CLUSTER,
        metavar="URL",
    )
    storage_options: Mapping[str, Any] = option(
        help="fsspec options for input and output, e.g. '{\"anon\": true}' (never logged)",
        group=CLUSTER,
        metavar="JSON",
        parse=parse_json_object,
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is empty: give a folder or an s3:// prefix")
        if not self.output:
            raise ConfigError("--output is empty: give a folder or an s3:// prefix")
        for name, choices in (
            ("resize", RESIZE_MODES),
            ("precision", PRECISIONS),
            ("decode_device", DECODE_DEVICES),
            ("compile", COMPILE_MODES),
            ("gate", GATES),
            ("reuse", REUSE_MODES),
        ):
            value = getattr(self, name)
            if value not in choices:
                flag = name.replace("_", "-")
                raise ConfigError(f"--{flag} {value!r}: choose one of {', '.join(choices)}")
        for name in (  # integers >= 1; the optional ones may be None
            "batch_size",
            "limit",
            "model_threads",
            "decode_batch_size",
            "decode_memory",
            "rows_per_file",
            "commit_every",
            "list_concurrency",
            "calls_per_actor",
            "max_image_pixels",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be an integer >= 1")
        if not isinstance(self.probe, int) or self.probe < 0:
            raise ConfigError(f"--probe {self.probe!r}: must be an integer >= 0")
        if self.probe_tolerance is not None and not self.probe_tolerance > 0:
            raise ConfigError(f"--probe-tolerance {self.probe_tolerance}: must be > 0")
        for name in ("cleanup_retention", "drain_seconds", "lost_node_wait"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate {self.max_error_rate}: must be between 0 and 1")
        for name in ("decode_cpus", "write_cpus", "model_cpus", "commit_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0")
        if self.object_store_memory is not None and self.object_store_memory < 78 * 2**20:
            raise ConfigError(
                f"--object-store-memory {self.object_store_memory}: Ray needs at least 78 MiB"
            )
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"--num-gpus {self.num_gpus}: must be >= 0")
        try:
            check_concurrency(self.concurrency)
        except ValueError as exc:
            raise ConfigError(f"--concurrency {exc}") from None
        sha256 = self.weights_sha256
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ConfigError(
                "--weights-sha256 must be the full 64-hex-digit sha256 (lower case) of the file"
            )
        if sha256 is not None and self.weights == "random":
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
