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


def main() -> None:  # noqa: C901 - one script, one section after another
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
    from pipeline.preprocessing import preprocess_spec

    spec = preprocess_spec("center-crop")
    draft_spec = preprocess_spec("center-crop", jpeg_draft=True)
    crop = spec.crop_size
    quick = args.quick
    started = time.perf_counter()
    lines: list[str] = []
    section = ["making the corpus"]  # what runs now, for the watchdog's report

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    @contextlib.contextmanager
    def guard(what: str) -> Iterator[None]:
        """A section that fails is reported as failed, and the bench goes on."""
        section[0] = what
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            say(f"{what}: failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    with (
        tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp,
        context.Pool(args.workers) as pool,
    ):
        distinct = 48 if quick else 192
        imagenet = make_files(pool, IMAGENET_SIZES, distinct)
        phone = make_files(pool, PHONE_SIZES, 2 if quick else 6)
        odd = {
            kind: make_files(pool, IMAGENET_SIZES[:2], 2, kind)
            for kind in ("progressive", "gray", "cmyk", "rotated", "png")
        }
        folder = Path(tmp) / "imagenet"
        folder.mkdir()
        paths = []
        for i, data in enumerate(imagenet):
            path = folder / f"{i:05d}.jpg"
            path.write_bytes(data)
            paths.append(str(path))
        corpus_s = time.perf_counter() - started

        import torch

        from pipeline.decode import decode_image
        from pipeline.decode_device import (
            decode_jpegs,
            decode_on_device,
            device_decodable,
            resize_on_device,
        )
        from pipeline.embed import ResNet50Embedder
        from pipeline.weights import load_weights

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = device.type == "cuda"
        budget = args.budget or ((170 if quick else 450) if cuda else (170 if quick else 900))
        deadline = Deadline(budget - (time.perf_counter() - started))
        title = f"GPU bench ({device.type}{', quick' if quick else ''})"

        def cut_off() -> None:
            """The watchdog: keep what was measured, say where it stuck, and exit."""
            say("")
            say(
                f"**Cut off by the watchdog** {args.watchdog_grace:.0f} s past the {budget:.0f} s budget, "
                f"{time.perf_counter() - started:.0f} s in, during: {section[0]}. The figures "
                "above were measured; the sections after it did not run. Stacks on stderr."
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            append(title, lines, path=args.results)
            for child in mp.active_children():
                child.kill()
            os._exit(3)

        watchdog = threading.Timer(max(0.0, deadline.left() + args.watchdog_grace), cut_off)
        watchdog.daemon = True
        watchdog.start()
        slice_s = (1.0 if quick else 2.0) if cuda else 1.0

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        def throughput(step: Callable[[], object], images: int) -> float:
            """Images/s of ``step`` (which handles ``images``), the device's queue drained."""

            def one() -> int:
                step()
                sync()
                return images

            return timed(one, slice_s)[0]

        def at_once(step: Callable[[], object], images: int, calls: int) -> float:
            """Images/s of ``calls`` threads calling ``step`` (``images`` each) over and over,
            as a model actor with ``--calls-per-actor calls`` does, the device's queue drained."""

            def one() -> int:
                step()
                return images

            with ThreadPoolExecutor(calls) as pool:
                t0 = time.perf_counter()
                done = sum(pool.map(lambda _: timed(one, slice_s)[1], range(calls)))
                sync()
                return done / (time.perf_counter() - t0)

        weights = load_weights("random", seed=0)
        precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
        if cuda:
            batches = [128, 256] if quick else [64, 128, 256, 512]
        else:
            batches = [16] if quick else [16, 32]
        models: dict[str, ResNet50Embedder] = {}

        def new_model(precision: str, **options: Any) -> ResNet50Embedder:
            """The model stage with the bench's weights, on the bench's device."""
            return ResNet50Embedder(
                state_dict=weights.state_dict,
                mean=spec.mean,
                std=spec.std,
                precision=precision,  # type: ignore[arg-type]
                device=device.type,
                **options,
            )

        def model(precision: str) -> ResNet50Embedder:
            if precision not in models:
                models[precision] = new_model(precision, batch_hint=max(batches))
            return models[precision]

        say(
            f"Device {torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__}; "
            f"{args.workers} decode processes; corpus: {len(imagenet)} ImageNet-size JPEGs "
            f"({', '.join(f'{w}x{h}' for w, h in IMAGENET_SIZES)}), {len(phone)} 12 MP JPEGs, "
            f"made in {corpus_s:.0f} s. TF32 convolutions: "
            f"{torch.backends.cudnn.allow_tf32 if cuda else 'n/a'}; cudnn.benchmark on; "
            "channels_last. Seeded random weights (speed and agreement do not depend on them)."
        )

        # --- 1. correctness ------------------------------------------------------------------
        section[0] = "correctness"
        say("")
        say("### Agreement")
        say("")
        with guard("agreement"):
            sample = imagenet[:16]
            pixels = np.stack(
                [decode_image(d, spec, max_image_pixels=MAX_PIXELS).pixels for d in sample]
            )
            cpu_model = ResNet50Embedder(
                state_dict=weights.state_dict, mean=spec.mean, std=spec.std, device="cpu"
            )
            reference = cpu_model.embed(pixels)

            def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))

            say("| check | largest relative L2 over 16 images |")
            say("| --- | --- |")
            if cuda:
                for precision in precisions:
                    got = model(precision).embed(pixels)
                    say(
                        f"| CUDA {precision} model vs CPU fp32 model, same pixels | {rel_l2(got, reference):.4f} |"
                    )
            contents: list[bytes | BaseException] = list(sample)
            on_device = decode_on_device(contents, spec, max_image_pixels=MAX_PIXELS, device=device)
            device_pixels = on_device.pixels.permute(0, 2, 3, 1).cpu().numpy()
            diff = np.abs(device_pixels.astype(np.int16) - pixels.astype(np.int16))
            got = model("fp32").embed(device_pixels)
            cpu_got = model("fp32").embed(pixels)
            say(
                f"| GPU-decode pixels vs CPU-decode pixels, same model ({device.type} fp32): "
                f"pixel |diff| mean {diff.mean():.3f}, max {diff.max()} | {rel_l2(got, cpu_got):.4f} |"
            )
            say("")
            fell_back = []
            for kind, files in odd.items():
                batch = decode_on_device(
                    list(files), spec, max_image_pixels=MAX_PIXELS, device=device
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
            say(f"Where odd files were decoded by `decode_on_device`: {'; '.join(fell_back)}.")

        # --- 2. model-only ceiling ------------------------------------------------------------
        section[0] = "the model-only ceiling"
        say("")
        say("### Model-only ceiling (images/s)")
        say("")
        say(
            "| precision | "
            + " | ".join(f"batch {b}" for b in batches)
            + " | from host memory, best batch | the same, 2 calls at once |"
        )
        say("| --- | " + " | ".join("---" for _ in batches) + " | --- | --- |")
        rng = np.random.default_rng(0)
        host = rng.integers(0, 255, (max(batches), crop, crop, 3), dtype=np.uint8)
        on_gpu = torch.from_numpy(host).to(device).permute(0, 3, 1, 2).contiguous()
        ceiling: dict[str, tuple[float, int]] = {}
        for precision in precisions:
            cells = []
            with guard(f"model-only ceiling, {precision}"):
                for b in batches:
                    if deadline.left() < 120:
                        cells.append("skipped (budget)")
                        continue
                    m = model(precision)
                    m.embed_on_device(on_gpu[:b])
                    m.embed_on_device(on_gpu[:b])
                    rate = throughput(partial(m.embed_on_device, on_gpu[:b]), b)
                    cells.append(f"{rate:,.0f}")
                    ceiling[precision] = max(ceiling.get(precision, (0.0, 0)), (rate, b))
                if precision in ceiling:
                    best_b = ceiling[precision][1]
                    m = model(precision)
                    m.embed(host[:best_b])
                    host_rate = throughput(partial(m.embed, host[:best_b]), best_b)
                    cells.append(f"{host_rate:,.0f} (batch {best_b})")
                    # --calls-per-actor 2: one call's copy overlaps the other's forward pass.
                    m2 = new_model(precision, batch_hint=best_b, concurrent_calls=2)
                    m2.embed(host[:best_b])
                    two = at_once(partial(m2.embed, host[:best_b]), best_b, 2)
                    cells.append(f"{two:,.0f}")
                else:
                    cells += ["skipped", "skipped"]
                say(f"| {precision} | " + " | ".join(cells) + " |")
        best_precision = max(ceiling, key=lambda p: ceiling[p][0]) if ceiling else "fp32"
        best_rate, best_batch = ceiling.get(best_precision, (float("nan"), batches[-1]))
        say("")
        compile_for = ([] if quick else ["bf16", "fp16"]) if cuda else []
        compiled_rates: dict[str, float] = {}
        for precision in compile_for:
            if deadline.left() < 200:
                say(f"torch.compile, {precision}: skipped (budget).")
                continue
            t0 = time.perf_counter()
            section[0] = f"torch.compile, {precision}"
            try:
                compiled_model = new_model(precision, compile=True, batch_hint=best_batch)
                compiled_model.embed_on_device(on_gpu[:best_batch])
                sync()
                compile_s = time.perf_counter() - t0
                compiled_model.embed_on_device(on_gpu[:best_batch])
                rate = throughput(
                    partial(compiled_model.embed_on_device, on_gpu[:best_batch]), best_batch
                )
                eager = ceiling.get(precision, (0.0, 0))[0]
                compiled_rates[precision] = rate
                say(
                    f"torch.compile, {precision}, batch {best_batch}: {rate:,.0f} images/s "
                    f"({rate / eager:.2f}x eager at that batch's best), first call {compile_s:.0f} s."
                )
            except Exception as exc:  # noqa: BLE001 - report and go on
                say(f"torch.compile, {precision}: failed: {' '.join(str(exc).split())[:200]}")
        if not compile_for:
            say("torch.compile: not run in this mode.")

        # --- 3. CPU decode per core ------------------------------------------------------------
        section[0] = "CPU decode per core"
        say("")
        say("### CPU decode + resize, one core (images/s)")
        say("")
        say("| files | exact | draft (libjpeg DCT scaling) |")
        say("| --- | --- | --- |")
        per_core: dict[tuple[str, bool], float] = {}
        with guard("CPU decode per core"):
            for name, files in (("ImageNet-size JPEG", imagenet), ("12 MP JPEG", phone)):
                cells = []
                for draft in (False, True):
                    if deadline.left() < 90:
                        cells.append("skipped (budget)")
                        continue
                    s = draft_spec if draft else spec
                    rate = _per_core(
                        partial(decode_image, spec=s, max_image_pixels=MAX_PIXELS), files, slice_s
                    )
                    per_core[(name, draft)] = rate
                    cells.append(f"{rate:,.1f}")
                say(f"| {name} | " + " | ".join(cells) + " |")

        # --- 4. nvJPEG ---------------------------------------------------------------------------
        section[0] = "nvJPEG"
        say("")
        say(f"### Decode on the device ({device.type}), batch 256 (images/s)")
        say("")
        with guard("decode on the device"):
            nv_batch = 256
            stream = [imagenet[i % len(imagenet)] for i in range(nv_batch)]
            stream_contents: list[bytes | BaseException] = list(stream)
            decoded = decode_jpegs(stream, device)
            images_on_device = [t for t in decoded if t is not None]
            rate_decode = throughput(partial(decode_jpegs, stream, device), nv_batch)
            rate_resize = throughput(partial(resize_on_device, images_on_device, spec), nv_batch)
            rate_full = throughput(
                partial(
                    decode_on_device,
                    stream_contents,
                    spec,
                    max_image_pixels=MAX_PIXELS,
                    device=device,
                ),
                nv_batch,
            )
            header_rate = throughput(
                lambda: [device_decodable(d, MAX_PIXELS, spec) for d in stream], nv_batch
            )
            phone_stream: list[bytes] = [phone[i % len(phone)] for i in range(16)]
            rate_phone = throughput(partial(decode_jpegs, phone_stream, device), len(phone_stream))
            say("| step | ImageNet-size | 12 MP |")
            say("| --- | --- | --- |")
            say(f"| `decode_jpegs` alone | {rate_decode:,.0f} | {rate_phone:,.0f} |")
            say(f"| `resize_on_device` alone | {rate_resize:,.0f} | |")
            say(
                f"| `device_decodable` alone (the header walk, on the host) | {header_rate:,.0f} | |"
            )
            say(f"| `decode_on_device` (header checks + decode + resize) | {rate_full:,.0f} | |")

        # --- 5. end to end ------------------------------------------------------------------------
        section[0] = "end to end"
        say("")
        say(f"### End to end, one {device.type}, {best_precision}, batch {best_batch}")
        say("")
        e2e_images = (4096 if quick else 16384) if cuda else 64
        use_compile = [False] + ([True] if best_precision in compiled_rates else [])
        rows: list[str] = []

        def embedders(n: int, compiled: bool) -> list[ResNet50Embedder]:
            return [
                new_model(best_precision, compile=compiled, batch_hint=best_batch) for _ in range(n)
            ]

        def gpu_decode_path(threads: int, pipelined: bool, compiled: bool) -> tuple[float, float]:
            """``threads`` > 1: each thread its own model and CUDA stream, as actors sharing
            a GPU (``--num-gpus 1/threads``) would have, but under one GIL. ``pipelined``: the
            host decodes batch N+1 while the device still runs batch N's forward pass."""
            batch_contents: list[list[bytes | BaseException]] = [
                [imagenet[(j * best_batch + i) % len(imagenet)] for i in range(best_batch)]
                for j in range(max(threads, e2e_images // best_batch))
            ]
            models_ = embedders(threads, compiled)
            streams = [torch.cuda.Stream() if cuda else None for _ in range(threads)]

            def work(k: int, batches: list[list[bytes | BaseException]]) -> None:
                with torch.cuda.stream(streams[k]) if cuda else contextlib.nullcontext():
                    pending = None
                    for batch in batches:
                        out = decode_on_device(
                            batch, spec, max_image_pixels=MAX_PIXELS, device=device
                        )
                        if not pipelined:
                            models_[k].embed_on_device(out.pixels)
                            continue
                        features = models_[k].features_on_device(out.pixels)
                        if pending is not None:
                            pending.cpu()
                        pending = features
                    if pending is not None:
                        pending.cpu()

            with ThreadPoolExecutor(threads) as executor:
                list(executor.map(work, range(threads), [batch_contents[:2]] * threads))
                sync()
                cpu0, t0 = time.process_time(), time.perf_counter()
                shares = [batch_contents[k::threads] for k in range(threads)]
                list(executor.map(work, range(threads), shares))
                sync()
                wall = time.perf_counter() - t0
            n = len(batch_contents) * best_batch
            return n / wall, (time.process_time() - cpu0) / wall

        def cpu_decode_path(draft: bool, compiled: bool) -> tuple[float, float]:
            """Decode tasks of DECODE_TASK images (as Ray's decode tasks), their pixels
            gathered into model batches of ``best_batch``."""
            task = min(DECODE_TASK, best_batch)
            slots = 4 * args.workers
            memory = shared_memory.SharedMemory(create=True, size=slots * task * crop * crop * 3)
            try:
                view = np.ndarray((slots, task, crop, crop, 3), dtype=np.uint8, buffer=memory.buf)
                init = (memory.name, (task, crop, crop, 3), draft_spec if draft else spec)
                n_tasks = max(1, e2e_images // task)
                embedder = embedders(1, compiled)[0]
                embedder.embed(host[:best_batch])
                gathered = np.empty((best_batch, crop, crop, 3), dtype=np.uint8)
                with context.Pool(args.workers, _worker_init, init) as decode_pool:
                    # warm the workers (imports) before the clock starts
                    decode_pool.starmap(_decode_into, [(s, paths[:1]) for s in range(args.workers)])
                    free = list(range(slots))
                    pending: list[Any] = []
                    submitted = done = filled = 0
                    worker_cpu = 0.0
                    cpu0, t0 = time.process_time(), time.perf_counter()

                    def submit() -> None:
                        nonlocal submitted
                        slot = free.pop()
                        files = [paths[(submitted * task + i) % len(paths)] for i in range(task)]
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
                        if filled == best_batch or not pending:
                            embedder.embed(gathered[:filled])
                            done += filled
                            filled = 0
                    wall = time.perf_counter() - t0
                    driver_cpu = time.process_time() - cpu0
                return done / wall, (worker_cpu + driver_cpu) / wall
            finally:
                memory.close()
                memory.unlink()

        def model_stage_path(compiled: bool, calls: int) -> tuple[float, float]:
            """The pipeline's own model stage, as a Ray actor runs it: ``ResNet50Embedder``
            with ``decode_spec`` called on ``fetch_batch``'s batches (the files' bytes), from
            ``calls`` threads at once (``--calls-per-actor``)."""
            from pipeline.decode import fetch_batch

            stage = new_model(
                best_precision,
                compile=compiled,
                batch_hint=best_batch,
                decode_spec=spec,
                max_image_pixels=MAX_PIXELS,
                concurrent_calls=calls,
            )
            fetched = fetch_batch(listing_batch(paths), storage_options={})
            index = np.arange(best_batch) % len(paths)
            batch = {key: value[index] for key, value in fetched.items()}
            stage(batch)
            stage(batch)
            n_batches = max(calls, e2e_images // best_batch)

            def share(k: int) -> set[str]:
                errors: set[str] = set()
                for _ in range(k, n_batches, calls):
                    errors |= set(stage(batch)["error_type"])
                return errors

            cpu0, t0 = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(calls) as pool:
                errors = set().union(*pool.map(share, range(calls)))
            sync()
            wall = time.perf_counter() - t0
            assert errors == {""}, errors
            return n_batches * best_batch / wall, (time.process_time() - cpu0) / wall

        gpu_rate = cpu_rate = gpu_cores = 0.0
        for compiled in use_compile:
            for calls in (1, 2):
                what = ("compiled" if compiled else "eager") + (
                    f", {calls} calls at once (`--calls-per-actor {calls}`)" if calls > 1 else ""
                )
                if deadline.left() < 30:
                    rows.append(f"| the model stage, {what} | skipped (budget) | | |")
                    continue
                with guard(f"the model stage, {what}"):
                    rate, cores = model_stage_path(compiled, calls)
                    if rate > gpu_rate:
                        gpu_rate, gpu_cores = rate, cores
                    rows.append(
                        f"| the pipeline's model stage (`ResNet50Embedder` with `decode_spec` "
                        f"on `fetch_batch` batches, as a `--decode-device cuda` actor), {what} | "
                        f"{rate:,.0f} | {rate / best_rate:.2f} | {cores:.1f} |"
                    )
        variants = [(1, False, False), (1, True, False), (2, True, False)]
        variants += [(2, True, True)] if True in use_compile else []
        for threads, pipelined, compiled in variants:
            what = (
                ("one thread" if threads == 1 else f"{threads} threads, a model and stream each")
                + (", pipelined" if pipelined else ", in turn")
                + (", compiled" if compiled else "")
            )
            if deadline.left() < 30:
                rows.append(f"| {device.type} decode, {what} | skipped (budget) | | |")
                continue
            with guard(f"{device.type} decode path, {what}"):
                rate, cores = gpu_decode_path(threads, pipelined, compiled)
                if rate > gpu_rate:
                    gpu_rate, gpu_cores = rate, cores
                rows.append(
                    f"| {device.type} decode (`decode_on_device` + the model), {what} | "
                    f"{rate:,.0f} | {rate / best_rate:.2f} | {cores:.1f} |"
                )
        for draft, compiled in [(False, False), (True, False)] + (
            [(True, True)] if True in use_compile else []
        ):
            what = ("draft" if draft else "exact") + (", compiled model" if compiled else "")
            if deadline.left() < 30:
                rows.append(f"| CPU decode, {what} | skipped (budget) | | |")
                continue
            with guard(f"CPU decode path, {what}"):
                rate, cores = cpu_decode_path(draft, compiled)
                cpu_rate = max(cpu_rate, rate)
                rows.append(
                    f"| CPU decode, {what} (`decode_batch` tasks of {min(DECODE_TASK, best_batch)} in "
                    f"{args.workers} processes, pixels via shared memory, `embed`) | "
                    f"{rate:,.0f} | {rate / best_rate:.2f} | {cores:.1f} |"
                )
        say(
            f"{e2e_images} images a path (the corpus repeated); model-only ceiling at this "
            f"setting: {best_rate:,.0f} images/s eager"
            + (
                f", {compiled_rates[best_precision]:,.0f} compiled"
                if best_precision in compiled_rates
                else ""
            )
            + "."
        )
        say("")
        say("| path | images/s | of the eager ceiling | CPU cores busy (all processes) |")
        say("| --- | --- | --- | --- |")
        for row in rows:
            say(row)

        # --- 6. decode cores per GPU ----------------------------------------------------------------
        section[0] = "decode cores per GPU"
        say("")
        say("### Decode cores a GPU needs at its model-only ceiling")
        say("")
        for (name, draft), rate in per_core.items():
            if name.startswith("ImageNet"):
                say(
                    f"- CPU decode, {name}, {'draft' if draft else 'exact'}: "
                    f"{best_rate / rate:.1f} cores ({best_rate:,.0f} / {rate:,.1f} per core)."
                )
        if gpu_rate:
            say(
                f"- GPU decode: the header checks, the CPU fallbacks and the driver loop are the "
                f"CPU work; measured above as {gpu_cores:.1f} cores busy at {gpu_rate:,.0f} images/s."
            )
        say("")
        say(f"Total wall time of this bench: {time.perf_counter() - started:.0f} s.")
        watchdog.cancel()

    append(title, lines, path=args.results)


if __name__ == "__main__":
    main()
