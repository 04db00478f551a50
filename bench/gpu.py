"""The prepared GPU bench: the project's own stage code, without Ray, on one GPU machine.

    python -m bench.gpu                 # full, <= 8 minutes on an H100/H200
    python -m bench.gpu --quick         # <= 3 minutes
    python -m bench.gpu --quick --device cpu   # the smoke test any machine can run
    OUT=folder bash bench/gpu_machine.sh 300   # on a lent GPU machine: CUDA tests, then this

A lent GPU machine has torch, torchvision, Pillow, pyarrow, fsspec and numpy, but no Ray and no
s3fs, so this runs the stages directly: ``decode_batch`` in a pool of processes (as Ray's decode
tasks would), ``decode_on_device`` (nvJPEG) and ``ResNet50Embedder`` on the GPU. It reports:

- correctness: CUDA embeddings against the CPU model's, each precision, and the GPU decode
  path's pixels and embeddings against the CPU decode path's, with which files fell back;
- the model-only ceiling in fp32 (TF32 convolutions), bf16 and fp16, batch 64-512,
  channels_last, on inputs already on the GPU and from host memory (one call at a time, and
  two at once as ``--calls-per-actor 2`` runs them: a copy overlaps a forward pass), compile
  off and on;
- CPU decode images/s per core, ImageNet-size and 12 MP JPEGs, exact and draft;
- nvJPEG decode images/s (the device decoder alone, and with header checks and resize);
- end-to-end images/s per GPU with CPU decode (a pool of processes) and with GPU decode, the
  pipeline's model stage with one and with two calls at once;
- the decode cores per GPU each path needs.

Every section runs against one deadline (``--budget``): what does not fit is reported as
skipped, never guessed. A section that overruns the deadline by ``--watchdog-grace`` seconds (a
``torch.compile`` that hangs, say) is cut off by a watchdog: the figures measured so far are
still written, with the section that overran and every thread's stack, and the bench exits 3.
The block goes to bench/RESULTS.md, or to ``--results PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from bench.corpus import listing_batch, photo_like
from bench.results import RESULTS, append

MAX_PIXELS = 178_956_970  # the pipeline's default limit (Pillow's)
# Sizes common in ImageNet's validation set (mean about 400 x 350 after its 500-pixel cap).
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480)]
PHONE_SIZES = [(4032, 3024), (3024, 4032)]
DECODE_TASK = 64  # images a CPU decode task takes, as a Ray decode task would
# Seconds past the budget before the watchdog cuts the bench off, figures so far kept.
WATCHDOG_GRACE_S = 30


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def timed(fn: Callable[[], int], seconds: float, min_calls: int = 3) -> tuple[float, int]:
    """Call ``fn`` (it returns the images it did) for about ``seconds``; (images/s, images)."""
    done, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        done += fn()
        calls += 1
    return done / (time.perf_counter() - start), done


def _encode(job: tuple[tuple[int, int], int, str]) -> bytes:
    size, seed, kind = job
    image = photo_like(size, seed)
    buffer = io.BytesIO()
    if kind == "progressive":
        image.save(buffer, "JPEG", quality=90, progressive=True)
    elif kind == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif kind == "gray":
        image.convert("L").save(buffer, "JPEG", quality=90)
    elif kind == "rotated":
        from PIL import Image

        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW
        image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_files(
    pool: Any, sizes: list[tuple[int, int]], count: int, kind: str = "jpeg"
) -> list[bytes]:
    jobs = [(sizes[i % len(sizes)], 1000 * len(kind) + i, kind) for i in range(count)]
    return list(pool.map(_encode, jobs))


# --- the CPU decode path: decode_batch in worker processes, pixels in shared memory ----------

_worker: dict[str, Any] = {}


def _worker_init(shm_name: str, slot_shape: tuple[int, ...], spec: Any) -> None:
    memory = shared_memory.SharedMemory(name=shm_name)
    _worker["memory"] = memory  # keep the mapping alive
    buffer = memory.buf
    assert buffer is not None
    _worker["slots"] = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, *slot_shape)
    _worker["spec"] = spec


def _decode_into(slot: int, paths: list[str]) -> tuple[int, int, int, float]:
    """One decode task: ``decode_batch`` on local files, pixels written into a shared slot."""
    from pipeline.decode import decode_batch

    cpu = time.process_time()
    n = len(paths)
    out = decode_batch(
        listing_batch(paths), spec=_worker["spec"], storage_options={}, max_image_pixels=MAX_PIXELS
    )
    _worker["slots"][slot][:n] = out["image"]
    failed = int(sum(1 for e in out["error_type"] if e))
    return slot, n, failed, time.process_time() - cpu


def _per_core(fn: Callable[[bytes], object], files: list[bytes], seconds: float) -> float:
    fn(files[0])
    index = iter(range(10**12))

    def one() -> int:
        fn(files[next(index) % len(files)])
        return 1

    return timed(one, seconds, min_calls=len(files) if len(files) <= 8 else 8)[0]


class Bench:
    """What every section shares: the corpus, the device, the deadline, the models, the lines
    written so far, and the figures later sections build on."""

    def __init__(self, args: argparse.Namespace, context: Any, pool: Any, tmp: str) -> None:
        from pipeline.preprocessing import preprocess_spec

        self.args, self.context, self.quick = args, context, args.quick
        self.started = time.perf_counter()
        self.lines: list[str] = []
        self.section = "making the corpus"  # what runs now, for the watchdog's report
        self.spec = preprocess_spec("center-crop")
        self.draft_spec = preprocess_spec("center-crop", jpeg_draft=True)
        self.crop = self.spec.crop_size
        self.imagenet = make_files(pool, IMAGENET_SIZES, 48 if self.quick else 192)
        self.phone = make_files(pool, PHONE_SIZES, 2 if self.quick else 6)
        self.odd = {
            kind: make_files(pool, IMAGENET_SIZES[:2], 2, kind)
            for kind in ("progressive", "gray", "cmyk", "rotated", "png")
        }
        folder = Path(tmp) / "imagenet"
        folder.mkdir()
        self.paths = []
        for i, data in enumerate(self.imagenet):
            path = folder / f"{i:05d}.jpg"
            path.write_bytes(data)
            self.paths.append(str(path))
        self.corpus_s = time.perf_counter() - self.started

        import torch

        from pipeline.weights import load_weights

        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        quick, cuda = self.quick, self.cuda
        self.budget = args.budget or ((170 if quick else 450) if cuda else (170 if quick else 900))
        self.deadline = Deadline(self.budget - (time.perf_counter() - self.started))
        self.title = f"GPU bench ({self.device.type}{', quick' if quick else ''})"
        self.slice_s = (1.0 if quick else 2.0) if cuda else 1.0
        self.weights = load_weights("random", seed=0)
        self.precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
        if cuda:
            self.batches = [128, 256] if quick else [64, 128, 256, 512]
        else:
            self.batches = [16] if quick else [16, 32]
        self.models: dict[str, Any] = {}
        rng = np.random.default_rng(0)
        self.host = rng.integers(0, 255, (max(self.batches), self.crop, self.crop, 3), np.uint8)
        self.on_gpu = torch.from_numpy(self.host).to(self.device).permute(0, 3, 1, 2).contiguous()
        # Figures later sections build on.
        self.ceiling: dict[str, tuple[float, int]] = {}  # precision: (best images/s, batch)
        self.best_precision, self.best_rate, self.best_batch = "fp32", float("nan"), 0
        self.compiled_rates: dict[str, float] = {}
        self.per_core: dict[tuple[str, bool], float] = {}
        self.gpu_rate = self.gpu_cores = 0.0

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A section that fails is reported as failed, and the bench goes on."""
        self.section = what
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.say(f"{what}: failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def start_watchdog(self) -> threading.Timer:
        """Past the budget by ``--watchdog-grace``: keep what was measured, say where it
        stuck, and exit 3."""
        grace = self.args.watchdog_grace

        def cut_off() -> None:
            self.say("")
            self.say(
                f"**Cut off by the watchdog** {grace:.0f} s past the {self.budget:.0f} s budget, "
                f"{time.perf_counter() - self.started:.0f} s in, during: {self.section}. The "
                "figures above were measured; the sections after it did not run. Stacks on "
                "stderr."
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            append(self.title, self.lines, path=self.args.results)
            for child in mp.active_children():
                child.kill()
            os._exit(3)

        watchdog = threading.Timer(max(0.0, self.deadline.left() + grace), cut_off)
        watchdog.daemon = True
        watchdog.start()
        return watchdog

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def throughput(self, step: Callable[[], object], images: int) -> float:
        """Images/s of ``step`` (which handles ``images``), the device's queue drained."""

        def one() -> int:
            step()
            self.sync()
            return images

        return timed(one, self.slice_s)[0]

    def at_once(self, step: Callable[[], object], images: int, calls: int) -> float:
        """Images/s of ``calls`` threads calling ``step`` (``images`` each) over and over, as
        a model actor with ``--calls-per-actor calls`` does, the device's queue drained."""

        def one() -> int:
            step()
            return images

        with ThreadPoolExecutor(calls) as pool:
            t0 = time.perf_counter()
            done = sum(pool.map(lambda _: timed(one, self.slice_s)[1], range(calls)))
            self.sync()
            return done / (time.perf_counter() - t0)

    def new_model(self, precision: str, **options: Any) -> Any:
        """The model stage with the bench's weights, on the bench's device."""
        from pipeline.embed import ResNet50Embedder

        return ResNet50Embedder(
            state_dict=self.weights.state_dict,
            mean=self.spec.mean,
            std=self.spec.std,
            precision=precision,  # type: ignore[arg-type]
            device=self.device.type,
            **options,
        )

    def model(self, precision: str) -> Any:
        if precision not in self.models:
            self.models[precision] = self.new_model(precision, batch_hint=max(self.batches))
        return self.models[precision]

    def heading(self, text: str) -> None:
        self.say("")
        self.say(f"### {text}")
        self.say("")


def describe_setup(b: Bench) -> None:
    import torch

    b.say(
        f"Device {torch.cuda.get_device_name(0) if b.cuda else 'CPU'}, torch {torch.__version__}; "
        f"{b.args.workers} decode processes; corpus: {len(b.imagenet)} ImageNet-size JPEGs "
        f"({', '.join(f'{w}x{h}' for w, h in IMAGENET_SIZES)}), {len(b.phone)} 12 MP JPEGs, "
        f"made in {b.corpus_s:.0f} s. TF32 convolutions: "
        f"{torch.backends.cudnn.allow_tf32 if b.cuda else 'n/a'}; cudnn.benchmark on; "
        "channels_last. Seeded random weights (speed and agreement do not depend on them)."
    )


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def correctness(b: Bench) -> None:
    """CUDA embeddings against the CPU model's; GPU-decoded pixels against CPU-decoded ones;
    where odd files are decoded."""
    from pipeline.decode import decode_image
    from pipeline.decode_device import decode_on_device
    from pipeline.embed import ResNet50Embedder

    b.heading("Agreement")
    with b.guard("agreement"):
        sample = b.imagenet[:16]
        pixels = np.stack(
            [decode_image(d, b.spec, max_image_pixels=MAX_PIXELS).pixels for d in sample]
        )
        cpu_model = ResNet50Embedder(
            state_dict=b.weights.state_dict, mean=b.spec.mean, std=b.spec.std, device="cpu"
        )
        reference = cpu_model.embed(pixels)
        b.say("| check | largest relative L2 over 16 images |")
        b.say("| --- | --- |")
        if b.cuda:
            for precision in b.precisions:
                got = b.model(precision).embed(pixels)
                b.say(
                    f"| CUDA {precision} model vs CPU fp32 model, same pixels "
                    f"| {_rel_l2(got, reference):.4f} |"
                )
        contents: list[bytes | BaseException] = list(sample)
        on_device = decode_on_device(contents, b.spec, max_image_pixels=MAX_PIXELS, device=b.device)
        device_pixels = on_device.pixels.permute(0, 2, 3, 1).cpu().numpy()
        diff = np.abs(device_pixels.astype(np.int16) - pixels.astype(np.int16))
        got = b.model("fp32").embed(device_pixels)
        cpu_got = b.model("fp32").embed(pixels)
        b.say(
            f"| GPU-decode pixels vs CPU-decode pixels, same model ({b.device.type} fp32): "
            f"pixel |diff| mean {diff.mean():.3f}, max {diff.max()} | {_rel_l2(got, cpu_got):.4f} |"
        )
        b.say("")
        fell_back = []
        for kind, files in b.odd.items():
            batch = decode_on_device(
                list(files), b.spec, max_image_pixels=MAX_PIXELS, device=b.device
            )
            where = (
                "device"
                if batch.on_device.all()
                else "CPU"
                if not batch.on_device.any()
                else "mixed"
            )
            errors = [e for e in batch.error_type if e]
            fell_back.append(f"{kind}: {where}" + (f" (errors {errors})" if errors else ""))
        b.say(f"Where odd files were decoded by `decode_on_device`: {'; '.join(fell_back)}.")


def model_ceiling(b: Bench) -> None:
    """Model-only images/s per precision and batch, on the device and from host memory, one
    call at a time and two at once."""
    b.heading("Model-only ceiling (images/s)")
    b.say(
        "| precision | "
        + " | ".join(f"batch {n}" for n in b.batches)
        + " | from host memory, best batch | the same, 2 calls at once |"
    )
    b.say("| --- | " + " | ".join("---" for _ in b.batches) + " | --- | --- |")
    for precision in b.precisions:
        cells: list[str] = []
        with b.guard(f"model-only ceiling, {precision}"):
            for n in b.batches:
                if b.deadline.left() < 120:
                    cells.append("skipped (budget)")
                    continue
                m = b.model(precision)
                m.embed_on_device(b.on_gpu[:n])
                m.embed_on_device(b.on_gpu[:n])
                rate = b.throughput(partial(m.embed_on_device, b.on_gpu[:n]), n)
                cells.append(f"{rate:,.0f}")
                b.ceiling[precision] = max(b.ceiling.get(precision, (0.0, 0)), (rate, n))
            cells += _from_host(b, precision)
            b.say(f"| {precision} | " + " | ".join(cells) + " |")
    b.best_precision = max(b.ceiling, key=lambda p: b.ceiling[p][0]) if b.ceiling else "fp32"
    b.best_rate, b.best_batch = b.ceiling.get(b.best_precision, (float("nan"), b.batches[-1]))


def _from_host(b: Bench, precision: str) -> list[str]:
    """The best batch's rate from host memory, one call at a time and two at once."""
    if precision not in b.ceiling:
        return ["skipped", "skipped"]
    best = b.ceiling[precision][1]
    m = b.model(precision)
    m.embed(b.host[:best])
    host_rate = b.throughput(partial(m.embed, b.host[:best]), best)
    # --calls-per-actor 2: one call's copy overlaps the other's forward pass.
    m2 = b.new_model(precision, batch_hint=best, concurrent_calls=2)
    m2.embed(b.host[:best])
    two = b.at_once(partial(m2.embed, b.host[:best]), best, 2)
    return [f"{host_rate:,.0f} (batch {best})", f"{two:,.0f}"]


def compile_rates(b: Bench) -> None:
    """``torch.compile`` at the best batch, bf16 and fp16 (full mode on CUDA only)."""
    b.say("")
    compile_for = ([] if b.quick else ["bf16", "fp16"]) if b.cuda else []
    for precision in compile_for:
        if b.deadline.left() < 200:
            b.say(f"torch.compile, {precision}: skipped (budget).")
            continue
        t0 = time.perf_counter()
        b.section = f"torch.compile, {precision}"
        try:
            model = b.new_model(precision, compile=True, batch_hint=b.best_batch)
            model.embed_on_device(b.on_gpu[: b.best_batch])
            b.sync()
            compile_s = time.perf_counter() - t0
            model.embed_on_device(b.on_gpu[: b.best_batch])
            rate = b.throughput(
                partial(model.embed_on_device, b.on_gpu[: b.best_batch]), b.best_batch
            )
            eager = b.ceiling.get(precision, (0.0, 0))[0]
            b.compiled_rates[precision] = rate
            b.say(
                f"torch.compile, {precision}, batch {b.best_batch}: {rate:,.0f} images/s "
                f"({rate / eager:.2f}x eager at that batch's best), first call {compile_s:.0f} s."
            )
        except Exception as exc:  # noqa: BLE001 - report and go on
            b.say(f"torch.compile, {precision}: failed: {' '.join(str(exc).split())[:200]}")
    if not compile_for:
        b.say("torch.compile: not run in this mode.")


def cpu_decode_per_core(b: Bench) -> None:
    from pipeline.decode import decode_image

    b.heading("CPU decode + resize, one core (images/s)")
    b.say("| files | exact | draft (libjpeg DCT scaling) |")
    b.say("| --- | --- | --- |")
    with b.guard("CPU decode per core"):
        for name, files in (("ImageNet-size JPEG", b.imagenet), ("12 MP JPEG", b.phone)):
            cells = []
            for draft in (False, True):
                if b.deadline.left() < 90:
                    cells.append("skipped (budget)")
                    continue
                spec = b.draft_spec if draft else b.spec
                decode = partial(decode_image, spec=spec, max_image_pixels=MAX_PIXELS)
                rate = _per_core(decode, files, b.slice_s)
                b.per_core[(name, draft)] = rate
                cells.append(f"{rate:,.1f}")
            b.say(f"| {name} | " + " | ".join(cells) + " |")


def device_decode(b: Bench) -> None:
    """nvJPEG alone, resize alone, the header walk alone, and all of ``decode_on_device``."""
    from pipeline.decode_device import (
        decode_jpegs,
        decode_on_device,
        device_decodable,
        resize_on_device,
    )

    b.heading(f"Decode on the device ({b.device.type}), batch 256 (images/s)")
    with b.guard("decode on the device"):
        n = 256
        stream = [b.imagenet[i % len(b.imagenet)] for i in range(n)]
        contents: list[bytes | BaseException] = list(stream)
        images = [t for t in decode_jpegs(stream, b.device) if t is not None]
        rate_decode = b.throughput(partial(decode_jpegs, stream, b.device), n)
        rate_resize = b.throughput(partial(resize_on_device, images, b.spec), n)
        rate_full = b.throughput(
            partial(
                decode_on_device, contents, b.spec, max_image_pixels=MAX_PIXELS, device=b.device
            ),
            n,
        )
        header_rate = b.throughput(
            lambda: [device_decodable(d, MAX_PIXELS, b.spec) for d in stream], n
        )
        phone: list[bytes] = [b.phone[i % len(b.phone)] for i in range(16)]
        rate_phone = b.throughput(partial(decode_jpegs, phone, b.device), len(phone))
        b.say("| step | ImageNet-size | 12 MP |")
        b.say("| --- | --- | --- |")
        b.say(f"| `decode_jpegs` alone | {rate_decode:,.0f} | {rate_phone:,.0f} |")
        b.say(f"| `resize_on_device` alone | {rate_resize:,.0f} | |")
        b.say(f"| `device_decodable` alone (the header walk, on the host) | {header_rate:,.0f} | |")
        b.say(f"| `decode_on_device` (header checks + decode + resize) | {rate_full:,.0f} | |")


def _e2e_images(b: Bench) -> int:
    return (4096 if b.quick else 16384) if b.cuda else (32 if b.quick else 64)


def gpu_decode_path(b: Bench, threads: int, pipelined: bool, compiled: bool) -> tuple[float, float]:
    """``threads`` > 1: each thread its own model and CUDA stream, as actors sharing a GPU
    (``--num-gpus 1/threads``) would have, but under one GIL. ``pipelined``: the host decodes
    batch N+1 while the device still runs batch N's forward pass."""
    import torch

    from pipeline.decode_device import decode_on_device

    size = b.best_batch
    batch_contents: list[list[bytes | BaseException]] = [
        [b.imagenet[(j * size + i) % len(b.imagenet)] for i in range(size)]
        for j in range(max(threads, _e2e_images(b) // size))
    ]
    models = [
        b.new_model(b.best_precision, compile=compiled, batch_hint=size) for _ in range(threads)
    ]
    streams = [torch.cuda.Stream() if b.cuda else None for _ in range(threads)]

    def work(k: int, batches: list[list[bytes | BaseException]]) -> None:
        with torch.cuda.stream(streams[k]) if b.cuda else contextlib.nullcontext():
            pending = None
            for batch in batches:
                out = decode_on_device(batch, b.spec, max_image_pixels=MAX_PIXELS, device=b.device)
                if not pipelined:
                    models[k].embed_on_device(out.pixels)
                    continue
                features = models[k].features_on_device(out.pixels)
                if pending is not None:
                    pending.cpu()
                pending = features
            if pending is not None:
                pending.cpu()

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(work, range(threads), [batch_contents[:2]] * threads))
        b.sync()
        cpu0, t0 = time.process_time(), time.perf_counter()
        shares = [batch_contents[k::threads] for k in range(threads)]
        list(executor.map(work, range(threads), shares))
        b.sync()
        wall = time.perf_counter() - t0
    return len(batch_contents) * size / wall, (time.process_time() - cpu0) / wall


def cpu_decode_path(b: Bench, draft: bool, compiled: bool) -> tuple[float, float]:
    """Decode tasks of DECODE_TASK images (as Ray's decode tasks), their pixels gathered into
    model batches of the best batch size."""
    size, crop, workers = b.best_batch, b.crop, b.args.workers
    task = min(DECODE_TASK, size)
    slots = 4 * workers
    memory = shared_memory.SharedMemory(create=True, size=slots * task * crop * crop * 3)
    try:
        view = np.ndarray((slots, task, crop, crop, 3), dtype=np.uint8, buffer=memory.buf)
        init = (memory.name, (task, crop, crop, 3), b.draft_spec if draft else b.spec)
        n_tasks = max(1, _e2e_images(b) // task)
        embedder = b.new_model(b.best_precision, compile=compiled, batch_hint=size)
        embedder.embed(b.host[:size])
        gathered = np.empty((size, crop, crop, 3), dtype=np.uint8)
        with b.context.Pool(workers, _worker_init, init) as decode_pool:
            # warm the workers (imports) before the clock starts
            decode_pool.starmap(_decode_into, [(s, b.paths[:1]) for s in range(workers)])
            free = list(range(slots))
            pending: list[Any] = []
            submitted = done = filled = 0
            worker_cpu = 0.0
            cpu0, t0 = time.process_time(), time.perf_counter()

            def submit() -> None:
                nonlocal submitted
                slot = free.pop()
                files = [b.paths[(submitted * task + i) % len(b.paths)] for i in range(task)]
                pending.append(decode_pool.apply_async(_decode_into, (slot, files)))
                submitted += 1

            while free and submitted < n_tasks:
                submit()
            while pending:
                slot, n, _, cpu = pending.pop(0).get()
                worker_cpu += cpu
                gathered[filled : filled + n] = view[slot][:n]
                filled += n
                free.append(slot)
                if submitted < n_tasks:
                    submit()
                if filled == size or not pending:
                    embedder.embed(gathered[:filled])
                    done += filled
                    filled = 0
            wall = time.perf_counter() - t0
            driver_cpu = time.process_time() - cpu0
        return done / wall, (worker_cpu + driver_cpu) / wall
    finally:
        memory.close()
        memory.unlink()


def model_stage_path(b: Bench, compiled: bool, calls: int) -> tuple[float, float]:
    """The pipeline's own model stage, as a Ray actor runs it: ``ResNet50Embedder`` with
    ``decode_spec`` called on ``fetch_batch``'s batches (the files' bytes), from ``calls``
    threads at once (``--calls-per-actor``)."""
    from pipeline.decode import fetch_batch

    size = b.best_batch
    stage = b.new_model(
        b.best_precision,
        compile=compiled,
        batch_hint=size,
        decode_spec=b.spec,
        max_image_pixels=MAX_PIXELS,
        concurrent_calls=calls,
    )
    fetched = fetch_batch(listing_batch(b.paths), storage_options={})
    index = np.arange(size) % len(b.paths)
    batch = {key: value[index] for key, value in fetched.items()}
    stage(batch)
    stage(batch)
    n_batches = max(calls, _e2e_images(b) // size)

    def share(k: int) -> set[str]:
        errors: set[str] = set()
        for _ in range(k, n_batches, calls):
            errors |= set(stage(batch)["error_type"])
        return errors

    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        errors = set().union(*pool.map(share, range(calls)))
    b.sync()
    wall = time.perf_counter() - t0
    assert errors == {""}, errors
    return n_batches * size / wall, (time.process_time() - cpu0) / wall


def end_to_end(b: Bench) -> None:
    """Images/s per device of each path, the model stage's and the bench's own."""
    b.heading(f"End to end, one {b.device.type}, {b.best_precision}, batch {b.best_batch}")
    use_compile = [False] + ([True] if b.best_precision in b.compiled_rates else [])
    paths: list[tuple[str, str, Callable[[], tuple[float, float]], bool]] = []
    for compiled in use_compile:
        for calls in (1, 2):
            what = ("compiled" if compiled else "eager") + (
                f", {calls} calls at once (`--calls-per-actor {calls}`)" if calls > 1 else ""
            )
            row = (
                "the pipeline's model stage (`ResNet50Embedder` with `decode_spec` on "
                f"`fetch_batch` batches, as a `--decode-device cuda` actor), {what}"
            )
            step = partial(model_stage_path, b, compiled, calls)
            paths.append((f"the model stage, {what}", row, step, True))
    variants = [(1, False, False), (1, True, False), (2, True, False)]
    variants += [(2, True, True)] if True in use_compile else []
    for threads, pipelined, compiled in variants:
        what = (
            ("one thread" if threads == 1 else f"{threads} threads, a model and stream each")
            + (", pipelined" if pipelined else ", in turn")
            + (", compiled" if compiled else "")
        )
        row = f"{b.device.type} decode (`decode_on_device` + the model), {what}"
        step = partial(gpu_decode_path, b, threads, pipelined, compiled)
        paths.append((f"{b.device.type} decode, {what}", row, step, True))
    task = min(DECODE_TASK, b.best_batch)
    drafts = [(False, False), (True, False)] + ([(True, True)] if True in use_compile else [])
    for draft, compiled in drafts:
        what = ("draft" if draft else "exact") + (", compiled model" if compiled else "")
        row = (
            f"CPU decode, {what} (`decode_batch` tasks of {task} in {b.args.workers} processes, "
            "pixels via shared memory, `embed`)"
        )
        step = partial(cpu_decode_path, b, draft, compiled)
        paths.append((f"CPU decode, {what}", row, step, False))
    rows = [_measure_path(b, *path) for path in paths]
    compiled_rate = b.compiled_rates.get(b.best_precision)
    b.say(
        f"{_e2e_images(b)} images a path (the corpus repeated); model-only ceiling at this "
        f"setting: {b.best_rate:,.0f} images/s eager"
        + (f", {compiled_rate:,.0f} compiled" if compiled_rate else "")
        + "."
    )
    b.say("")
    b.say("| path | images/s | of the eager ceiling | CPU cores busy (all processes) |")
    b.say("| --- | --- | --- | --- |")
    for row in rows:
        b.say(row)


def _measure_path(
    b: Bench, name: str, row: str, step: Callable[[], tuple[float, float]], device: bool
) -> str:
    """One end-to-end path's table row; ``device``: a device-decode path, whose best rate
    and cores feed the decode-cores section."""
    if b.deadline.left() < 30:
        return f"| {name} | skipped (budget) | | |"
    with b.guard(f"{name} path"):
        rate, cores = step()
        if device and rate > b.gpu_rate:
            b.gpu_rate, b.gpu_cores = rate, cores
        return f"| {row} | {rate:,.0f} | {rate / b.best_rate:.2f} | {cores:.1f} |"
    return f"| {name} | failed | | |"


def decode_cores(b: Bench) -> None:
    b.heading("Decode cores a GPU needs at its model-only ceiling")
    for (name, draft), rate in b.per_core.items():
        if name.startswith("ImageNet"):
            b.say(
                f"- CPU decode, {name}, {'draft' if draft else 'exact'}: "
                f"{b.best_rate / rate:.1f} cores ({b.best_rate:,.0f} / {rate:,.1f} per core)."
            )
    if b.gpu_rate:
        b.say(
            f"- GPU decode: the header checks, the CPU fallbacks and the driver loop are the "
            f"CPU work; measured above as {b.gpu_cores:.1f} cores busy at {b.gpu_rate:,.0f} "
            "images/s."
        )


# The bench's sections, in order: (what the watchdog names, the section).
SECTIONS: tuple[tuple[str, Callable[[Bench], None]], ...] = (
    ("correctness", correctness),
    ("the model-only ceiling", model_ceiling),
    ("torch.compile", compile_rates),
    ("CPU decode per core", cpu_decode_per_core),
    ("nvJPEG", device_decode),
    ("end to end", end_to_end),
    ("decode cores per GPU", decode_cores),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--quick", action="store_true", help="fewer settings, <= 3 minutes")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all sections")
    parser.add_argument(
        "--watchdog-grace",
        type=float,
        default=WATCHDOG_GRACE_S,
        help="seconds past the budget before the bench is cut off, figures so far kept",
    )
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Worker processes are spawned before CUDA is initialised, and never forked from it.
    context = mp.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp,
        context.Pool(args.workers) as pool,
    ):
        bench = Bench(args, context, pool, tmp)
        watchdog = bench.start_watchdog()
        describe_setup(bench)
        for name, section in SECTIONS:
            bench.section = name
            section(bench)
        bench.say("")
        bench.say(f"Total wall time of this bench: {time.perf_counter() - bench.started:.0f} s.")
        watchdog.cancel()
    append(bench.title, bench.lines, path=args.results)


if __name__ == "__main__":
    main()
