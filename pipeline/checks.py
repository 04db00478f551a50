"""A run, checked: the :class:`Run` object and the fail-fast rules that build it.

The input and output (:func:`check_run`, which builds the ``Run``), the model actors' GPUs and
CPUs against the Ray's (:func:`placed`), and the table's model against the run's
(:func:`check_same_model`): whatever can be refused in one line before any data moves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from pipeline.config import ConfigError, EmbedConfig, PipelineError
from pipeline.embed import ModelIdentity
from pipeline.inventory import InputList
from pipeline.listing import InputError
from pipeline.manifest import Manifest, new_run_id, utc_iso
from pipeline.output import Output, Snapshot
from pipeline.preprocessing import PreprocessSpec, preprocess_spec
from pipeline.storage import RAY_WORKING_DIR, is_local, open_fs, storage_errors, to_uri, within
from pipeline.weights import ResolvedWeights, sniff_checkpoint, weights_name

logger = logging.getLogger(__name__)


class Input(NamedTuple):
    """A run's input, resolved and checked once: its filesystem, root and URI, and its
    ``--input-list`` opened (an inventory's manifest read)."""

    fs: Any
    root: str
    uri: str
    list: InputList | None


@dataclasses.dataclass(frozen=True)
class Run:
    """One run, built once by :func:`check_run` and handed whole to every step after it.

    The output's ``snapshot`` is read once the run holds the output's lease
    (:func:`pipeline.run.read_output`): the model check, the diff and every commit use it.
    ``weights`` are loaded by :func:`pipeline.run.prepare_run`; ``num_gpus`` and
    ``started_ray`` are settled by :func:`placed` once Ray is up. Nothing downstream derives
    any of them again from the config.
    """

    config: EmbedConfig
    run_id: str
    started: float
    started_at: str
    input: Input
    output: Output
    spec: PreprocessSpec
    snapshot: Snapshot | None = None  # the output, read once under the run's lease
    weights: ResolvedWeights | None = None
    num_gpus: float = 0.0  # per model actor; 0: CPU actors
    started_ray: bool = False  # this process started the Ray it runs on (fixed size)
    # The table's ContentIndex in the object store (pipeline.reuse); None: no reuse.
    content: Any = None
    # Stored rows the run re-embeds and compares before it commits (pipeline.probe).
    probes: tuple[Any, ...] = ()

    @property
    def model(self) -> ModelIdentity:
        """What makes this run's vectors: the loaded weights, and what the actors compute in.

        CPU actors compute fp32, or bf16 where asked for (they refuse it on CPUs without
        native bf16), and the output says so."""
        assert self.weights is not None, "prepare_run loads the weights"
        config = self.config
        return ModelIdentity(
            weights=self.weights.name,
            weights_sha256=self.weights.sha256,
            normalized=config.normalize,
            precision=(
                config.precision if self.num_gpus > 0 or config.precision == "bf16" else "fp32"
            ),
        )

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.spec.to_metadata()


def check_run(config: EmbedConfig, run_id: str | None = None, *, writes: bool = True) -> Run:
    """:func:`check_input_output`, then a writable output and a weights file that can be a
    checkpoint (from its first bytes): what fails in a second, before anything is listed or
    loaded. The run starts here: its id, clock and preprocessing are fixed now.

    ``writes=False``: a dry run, which writes nothing and loads no weights, so neither is
    checked."""
    started, started_at = time.time(), utc_iso()
    source, output = check_input_output(config)
    if writes:
        with storage_errors(output.uri):
            output.check_writable()
        sniff_checkpoint(config.weights, storage_options=config.fs_options())
    return Run(
        config=config,
        run_id=run_id or new_run_id(),
        started=started,
        started_at=started_at,
        input=source,
        output=output,
        spec=preprocess_spec(config.resize, jpeg_draft=config.jpeg_draft),
    )


def check_input_output(config: EmbedConfig) -> tuple[Input, Output]:
    """The input (its ``--input-list`` opened) and the output; refuses a missing input or list
    and an output inside the input."""
    options = config.fs_options()
    in_fs, in_root = open_fs(config.input, options)
    input_uri = to_uri(in_fs, in_root)
    output = Output(config.output, options)
    if is_local(in_fs) and is_local(output.fs):
        inside = within(output.root, in_root)  # real paths: through links and ".."
    else:
        inside = type(in_fs) is type(output.fs) and (output.root + "/").startswith(
            in_root.rstrip("/") + "/"
        )
    if inside:
        raise ConfigError(
            f"output {output.uri} is inside input {input_uri}: its Parquet files would be "
            "listed by later runs; choose an output outside the input"
        )
    for name, fs, root in (("--input", in_fs, in_root), ("--output", output.fs, output.root)):
        if is_local(fs) and RAY_WORKING_DIR in os.path.realpath(root) + "/":
            raise ConfigError(
                f"{name} {root} lies in this Ray job's --working-dir, which Ray unpacks to a "
                "new folder for each job: images would be recorded under a path that changes "
                "from job to job. Give an absolute path outside it, or an s3:// URI"
            )
    with storage_errors(input_uri):
        if not in_fs.exists(in_root):
            raise InputError(f"input not found: {input_uri}")
    listed = InputList.open(config.input_list, input_uri, options) if config.input_list else None
    return Input(in_fs, in_root, input_uri, listed), output


def placed(run: Run) -> Run:
    """The run on the Ray it will use: GPUs per model actor resolved, and refused in one line
    where its model actors cannot run there (:func:`check_decode_device`,
    :func:`check_cpu_actors_fit`)."""
    import ray

    config = run.config
    num_gpus = resolve_num_gpus(config)
    started = started_local_ray()
    check_decode_device(config, num_gpus)
    check_cpu_actors_fit(config, num_gpus, ray.cluster_resources().get("CPU", 0.0), started)
    if num_gpus == 0 and config.calls_per_actor > 1:
        logger.warning(
            "--calls-per-actor %d on CPU model actors: that many forward passes share the "
            "node's cores at once (one already uses them all)",
            config.calls_per_actor,
        )
    return dataclasses.replace(run, num_gpus=num_gpus, started_ray=started)


def check_decode_device(config: EmbedConfig, num_gpus: float) -> None:
    """``--decode-device cuda`` needs GPU model actors: refuse it, in one line, elsewhere."""
    if config.decode_device == "cuda" and num_gpus <= 0:
        raise ConfigError(
            "--decode-device cuda needs GPU model actors, and this cluster has no GPU "
            "(or --num-gpus is 0): use --decode-device cpu"
        )


def check_cpu_actors_fit(config: EmbedConfig, num_gpus: float, cpus: float, fixed: bool) -> None:
    """CPU model actors and a decode task must fit the Ray's ``cpus`` together: actors that
    reserve every CPU leave decode none, and the run would wait forever. Refused in one line
    on a Ray of fixed size (``fixed``: the one this process started); on a cluster, whose
    autoscaler may add nodes, a warning."""
    if num_gpus > 0:
        return
    actors = config.concurrency if isinstance(config.concurrency, int) else config.concurrency[0]
    task = max(config.decode_cpus, config.write_cpus)
    need = actors * config.model_cpus + task
    if need <= cpus + 1e-9:
        return
    what = (
        f"--concurrency {actors}: CPU model actors reserve {config.model_cpus:g} CPU each "
        f"(--model-cpus) and decode and writer tasks {task:g} (--decode-cpus, --write-cpus), "
        f"{need:g} CPUs in all, and this Ray has {cpus:g}"
    )
    if fixed:
        if task < cpus:
            fits = f"--model-cpus {(cpus - task) / actors:.3g}"
        else:  # a task alone takes every CPU: halve it
            half = cpus / 2
            fits = f"--model-cpus {half / actors:.3g} --decode-cpus {half:g} --write-cpus {half:g}"
        raise ConfigError(
            f"{what}: nothing would be left to decode on; lower --concurrency, or reserve "
            f"less (e.g. {fits}, and --model-threads cores/actors)"
        )
    logger.warning("%s now: the run waits until the cluster grows", what)


def diff_base(run: Run) -> tuple[Manifest | None, bool]:
    """What the run's listing is diffed against, once the table's model is checked: the
    snapshot's manifest (an incremental run), a killed ``--full`` run's pending files of the
    same model (``True``: this one resumes them), or nothing (embed everything)."""
    assert run.snapshot is not None, "the run reads its output first"
    manifest, config = run.snapshot.manifest, run.config
    if manifest is None:
        return None, False
    if not config.full or config.limit is not None:  # adds to the table: same model only
        check_same_model(
            manifest, run.model, run.preprocessing, run.output.uri, limited_full=config.full
        )
    if not config.full:
        return manifest, False
    resume = manifest.pending is not None and manifest.pending.matches(run.model, run.preprocessing)
    return (manifest if resume else None), resume


def model_difference(run: Run) -> str | None:
    """Why the table's model differs from the one the run names, as far as is known without
    loading the weights (their name stands for their sha256)."""
    assert run.snapshot is not None, "the run reads its output first"
    manifest, config, output = run.snapshot.manifest, run.config, run.output
    if manifest is None or manifest.model is None:
        return None
    model = dataclasses.replace(
        manifest.model, weights=weights_name(config), normalized=config.normalize
    )
    if model.weights != manifest.model.weights:
        return (
            f"{output.uri} holds embeddings of weights {manifest.model.weights!r}, this run "
            f"names {model.weights!r}: it refuses them unless their sha256 is the recorded one "
            "(--full replaces the table)"
        )
    try:
        check_same_model(manifest, model, run.preprocessing, output.uri)
    except PipelineError as exc:
        return str(exc)
    return None


def check_same_model(
    previous: Manifest,
    model: ModelIdentity,
    preprocessing: Mapping[str, Any],
    output: str,
    *,
    limited_full: bool = False,
) -> None:
    """Refuse to mix vectors of different models or preprocessing in one table.

    ``limited_full``: the run is ``--full --limit N``, which adds to the table without
    replacing it, so it too must match the table's model.
    """
    fix = (
        "drop --limit, so that --full replaces the whole table"
        if limited_full
        else "pass --full to replace them, or use another output"
    )
    if previous.model is not None:
        difference = previous.model.first_difference(model)
        if difference:
            key, before, now = difference
            raise ConfigError(
                f"{output} holds embeddings with {key}={before!r}, this run would "
                f"write {key}={now!r}: {fix}"
            )
    # Only what turns pixels into inputs is compared, not descriptive keys.
    fields = [f.name for f in dataclasses.fields(PreprocessSpec)]
    before_spec = {k: _plain((previous.preprocessing or {}).get(k)) for k in fields}
    if before_spec != {k: _plain(preprocessing.get(k)) for k in fields}:
        raise ConfigError(
            f"{output} holds embeddings made with other preprocessing "
            f"({before_spec['mode']!r}): {fix}"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def resolve_num_gpus(config: EmbedConfig) -> float:
    """GPUs per model actor: ``--num-gpus``, else 1 where the cluster has GPUs, else 0."""
    import ray

    if config.num_gpus is not None:
        return config.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def started_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray of fixed size,
    whose head processes share its fate), rather than joined a running one."""
    ray = sys.modules.get("ray")  # never imported here: a process without Ray started none
    if ray is None or not ray.is_initialized():
        return False
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))
