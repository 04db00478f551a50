"""Seeded chaos: runs, compactions, kills and races on one output, then the output's invariants.

    python -m bench.chaos --rounds 200 --seed 7          # local disk and moto S3 taking turns
    python -m bench.chaos --rounds 4 --stores local      # a few rounds on one store

Each round changes the input (new, changed and deleted images), then plays one scenario with
real processes of the real command (``embed-images run`` / ``compact``, random weights, one
shared ``ray start --head`` that every process joins):

    run        one run, SIGKILLed at a random moment or not
    race       two runs started together; one of them may be SIGKILLed
    compact    a run and a compaction started together
    full       ``--full`` with the other of two weights, SIGKILLed at a random moment or not

then a run that is let finish, and checks, after the scenario and again after that run:

    the reader works; each URI at most once; every file the manifest lists exists; every
    current row was written under the manifest's model (its files' weights sha256); nothing
    outside the output changed; no canary credential in any file of the output
    (after the finishing run also:) every input image exactly once, embedded or failed

Figures (rounds, kills, races, refusals, checks) go to stdout as one JSON line, and to
``--json FILE``. The suite runs a few rounds with a fixed seed (``tests/test_chaos.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CANARY = "CHAOSCANARY0123456789"
SCENARIOS = ("run", "race", "compact", "full")
# The model per seed of --weights random: a --full run switches between them.
SEEDS = (0, 1)


@dataclasses.dataclass
class Tally:
    rounds: int = 0
    processes: int = 0
    kills: int = 0
    races: int = 0
    compactions: int = 0
    full_runs: int = 0
    refused_live: int = 0  # refused at the start: another run's lease
    refused_commit: int = 0  # refused at the commit: another process committed first
    failed_other: int = 0
    checks: int = 0
    scenarios: dict[str, int] = dataclasses.field(default_factory=dict)


class Chaos:
    """One store's output, its input folder, and the processes played against them."""

    def __init__(
        self,
        work: Path,
        store: str,
        rng: random.Random,
        endpoint: str | None,
        env: dict[str, str],
    ) -> None:
        self.work, self.store, self.rng, self.endpoint = work, store, rng, endpoint
        self.env = env  # the processes': the head's address and token
        self.photos = work / f"{store}-photos"
        self.photos.mkdir(parents=True, exist_ok=True)
        self.sentinel = work / f"{store}-beside-the-output.txt"
        self.sentinel.write_text("nothing may touch this file")
        if store == "s3":
            import s3fs

            bucket = f"chaos-{rng.getrandbits(40):010x}"
            s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
            self.output = f"s3://{bucket}/out"
        else:
            self.output = str(work / f"{store}-out")
        self.seed = SEEDS[0]  # the weights of the table
        self.next_image = 0
        self.tally = Tally()

    # -- the input ---------------------------------------------------------------------------

    def change_input(self) -> None:
        """Add some images, rewrite some (new bytes: a changed image), delete some, and now
        and then add a bad one."""
        rng = self.rng
        existing = sorted(self.photos.iterdir())
        for path in rng.sample(existing, k=min(len(existing), rng.randint(0, 3))):
            path.unlink()
        existing = sorted(self.photos.iterdir())
        for path in rng.sample(existing, k=min(len(existing), rng.randint(0, 3))):
            _write_image(path, rng.getrandbits(32))
        for _ in range(rng.randint(3, 10)):
            name = self.photos / f"img-{self.next_image:05d}.png"
            self.next_image += 1
            if rng.random() < 0.08:
                name.write_bytes(b"not an image")
            else:
                _write_image(name, rng.getrandbits(32))

    # -- processes ---------------------------------------------------------------------------

    def command(self, verb: str, *, seed: int | None = None, full: bool = False) -> list[str]:
        if verb == "compact":
            args = ["compact", self.output]
        else:
            args = ["run", "--input", str(self.photos), "--output", self.output]
            args += ["--weights", "random", "--seed", str(self.seed if seed is None else seed)]
            args += ["--batch-size", "8", "--decode-batch-size", "8", "--rows-per-file", "8"]
            args += ["--commit-every", "8", "--max-error-rate", "1", "--progress", "none"]
            args += ["--cleanup-retention", "0"]
            if full:
                args.append("--full")
        # A canary credential in the storage options (moto takes any): it must reach no file.
        options = {"key": "AKIACHAOS", "secret": CANARY}
        args += ["--storage-options", json.dumps(options)]
        if self.endpoint:
            args += ["--endpoint-url", self.endpoint]
        return args

    def start(self, args: list[str]) -> subprocess.Popen[bytes]:
        self.tally.processes += 1
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def finish(self, process: subprocess.Popen[bytes], *, kill_after: float | None) -> int:
        """Wait for the process, or SIGKILL it after ``kill_after`` seconds."""
        if kill_after is not None:
            try:
                process.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                self.tally.kills += 1
        _, err = process.communicate(timeout=600)
        status = process.returncode
        text = err.decode(errors="replace")
        if status == 1 and "is writing to" in text:
            self.tally.refused_live += 1
        elif status == 1 and "another run committed" in text:
            self.tally.refused_commit += 1
        elif status not in (0, -signal.SIGKILL):
            self.tally.failed_other += 1
            raise AssertionError(f"{self.store}: exit {status}: {text[-2000:]}")
        return status

    def maybe_kill(self) -> float | None:
        return self.rng.uniform(0.5, 8.0) if self.rng.random() < 0.5 else None

    # -- a round -------------------------------------------------------------------------------

    def round(self) -> None:
        self.change_input()
        scenario = self.rng.choice(SCENARIOS)
        self.tally.scenarios[scenario] = self.tally.scenarios.get(scenario, 0) + 1
        before = self.outside()
        if scenario == "run":
            self.finish(self.start(self.command("run")), kill_after=self.maybe_kill())
        elif scenario == "race":
            self.tally.races += 1
            first, second = self.start(self.command("run")), self.start(self.command("run"))
            self.finish(first, kill_after=self.maybe_kill())
            self.finish(second, kill_after=None)
        elif scenario == "compact":
            self.tally.compactions += 1
            if self.has_table():
                run = self.start(self.command("run"))
                time.sleep(self.rng.uniform(0.0, 4.0))  # the compaction lands anywhere
                compaction = self.start(self.command("compact"))
                self.finish(run, kill_after=None)
                self.finish(compaction, kill_after=self.maybe_kill())
            else:
                self.finish(self.start(self.command("run")), kill_after=None)
        else:
            self.tally.full_runs += 1
            # A killed --full run's pending files are taken up by a --full run of its model.
            pending = self.pending_seed()
            other = pending if pending is not None else SEEDS[self.seed == SEEDS[0]]
            status = self.finish(
                self.start(self.command("run", seed=other, full=True)),
                kill_after=self.maybe_kill(),
            )
            if status == 0:
                self.seed = other
        self.check(complete=False, before=before)
        # A run that is let finish.
        status = self.finish(self.start(self.command("run")), kill_after=None)
        assert status == 0, f"{self.store}: the finishing run exited {status}"
        self.check(complete=True, before=before)
        self.tally.rounds += 1

    def has_table(self) -> bool:
        from pipeline.read import read_manifest

        return read_manifest(self.output, storage_options=self.options()) is not None

    def pending_seed(self) -> int | None:
        """The seed of a killed --full run's pending files, if there are any."""
        from pipeline.read import read_manifest

        manifest = read_manifest(self.output, storage_options=self.options())
        if manifest is None or manifest.pending is None:
            return None
        return int(manifest.pending.model.weights.rsplit("=", 1)[-1])

    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint} if self.endpoint else {}

    # -- the invariants ------------------------------------------------------------------------

    def outside(self) -> str:
        """A digest of what lies outside the output: the input and the sentinel."""
        digest = hashlib.sha256(self.sentinel.read_bytes())
        for path in sorted(self.photos.iterdir()):
            digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()

    def check(self, *, complete: bool, before: str) -> None:
        from pipeline.output import Output
        from pipeline.read import read_embeddings

        out = Output(self.output, self.options())
        snapshot = out.snapshot()
        manifest = snapshot.manifest
        assert self.outside() == before, f"{self.store}: something outside the output changed"
        self.tally.checks += 1
        if manifest is None:
            assert not complete, f"{self.store}: no manifest after a finished run"
            return
        for path in manifest.listed_paths():
            assert out.fs.exists(f"{out.root}/{path}"), f"{self.store}: listed {path} is gone"
        self.tally.checks += 1
        embeddings = read_embeddings(self.output, storage_options=self.options())
        errors = read_embeddings(self.output, storage_options=self.options(), table="errors")
        uris = embeddings["uri"].to_pylist() + errors["uri"].to_pylist()
        assert len(uris) == len(set(uris)), f"{self.store}: a URI is current twice"
        self.tally.checks += 1
        assert manifest.model is not None
        for path in manifest.current.get("embeddings", []):
            with out.fs.open(f"{out.root}/{path}", "rb") as f:
                meta = pq.read_schema(f).metadata or {}
            sha = meta.get(b"weights_sha256", b"").decode()
            assert sha == manifest.model.weights_sha256, f"{self.store}: {path} of another model"
        self.tally.checks += 1
        out.fs.invalidate_cache()
        for path in out.fs.find(out.root):
            try:
                data = out.fs.cat_file(path)
            except FileNotFoundError:  # a killed driver's tasks may still tidy their staging
                continue
            assert CANARY.encode() not in data, f"{self.store}: canary in {path}"
        self.tally.checks += 1
        if complete:
            listed = {str(p) for p in self.photos.iterdir()}
            assert sorted(uris) == sorted(listed), (
                f"{self.store}: current {len(uris)} URIs, input {len(listed)} images"
            )
            self.tally.checks += 1


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="PNG")


@contextlib.contextmanager
def ray_head(work: Path) -> Iterator[dict[str, str]]:
    """``ray start --head`` (2 CPUs, token auth) in a session of its own, for the chaos
    processes to join; its process group is killed at the end (``ray stop`` would stop
    every Ray of the machine). Yields the environment that joins it."""
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        + [f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false"]
        + [f"--temp-dir={temp}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        joined = env | {"RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
        _wait_for_head(joined)
        yield joined
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_head(env: dict[str, str], timeout: float = 90) -> None:
    code = "import ray; ray.init(); print(ray.cluster_resources().get('CPU'))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray head did not come up in {timeout} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def play(
    work: Path, *, rounds: int, seed: int, stores: tuple[str, ...] = ("local", "s3")
) -> dict[str, Any]:
    """Play ``rounds`` rounds, the stores taking turns, and return the figures."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request lines
    rng = random.Random(seed)
    endpoint, server = None, None
    if "s3" in stores:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        with ray_head(work) as env:
            games = [
                Chaos(
                    work,
                    store,
                    random.Random(rng.getrandbits(64)),
                    endpoint if store == "s3" else None,
                    env,
                )
                for store in stores
            ]
            for number in range(rounds):
                game = games[number % len(games)]
                game.round()
                print(
                    f"round {number + 1}/{rounds} ({game.store}) ok, "
                    f"{time.time() - started:.0f} s: {json.dumps(dataclasses.asdict(game.tally))}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    figures: dict[str, Any] = {"seed": seed, "seconds": round(time.time() - started, 1)}
    for game in games:
        figures[game.store] = dataclasses.asdict(game.tally)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="rounds, the stores taking turns")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stores", default="local,s3", help="local, s3, or both")
    parser.add_argument("--work", type=Path, help="a folder for the inputs and outputs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so that the Ray head and moto are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    figures = play(work, rounds=args.rounds, seed=args.seed, stores=tuple(args.stores.split(",")))
    line = json.dumps(figures)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
