"""A real cluster: `ray start --head`, a second node declaring a GPU, `ray job submit`.

The model actors must land on the GPU-declaring node (where torch sees no CUDA, they compute on
CPU, same code), the decode tasks on the CPU head, and the output must be right.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.read import read_embeddings, read_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A head (2 CPUs, no GPU) and a worker node (0 CPUs, 1 declared GPU), token auth on;
    one for this module's jobs, as a real cluster takes many."""
    port, dashboard, client, agent_head, agent_worker = _free_ports(5)
    # Short paths: Ray's socket paths are limited. Each node gets its own temp dir, as on
    # separate machines: two raylets sharing one would share runtime_resources/, and the GPU
    # node's runtime-env agent, setting up the job's working_dir for the model actor, deletes
    # and re-extracts the very folder the driver is importing from (Ray unpacks with
    # overwrite=True), which made the job fail now and then with "No such file or directory".
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    worker_temp = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env |= {
        "PATH": f"{BIN}:{env['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PYTHONPATH": str(ROOT),
    }
    common = ["--block", "--node-ip-address=127.0.0.1"]
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            *common,
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_head}",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    processes = [head]
    try:
        _wait_for(lambda: _job_api_up(dashboard, env), "the head's job API")
        worker = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                *common,
                f"--address=127.0.0.1:{port}",
                "--num-cpus=0",
                "--num-gpus=1",
                f"--dashboard-agent-listen-port={agent_worker}",
                f"--temp-dir={worker_temp}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(worker)
        _wait_for(lambda: _gpu_nodes(dashboard, env) == 1, "the GPU node")
        yield {
            "dashboard": f"http://127.0.0.1:{dashboard}",
            **{k: env[k] for k in ("PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
        }
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(worker_temp, ignore_errors=True)


def _wait_for(check, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


def _state(dashboard: int, env: dict[str, str], code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code.replace("ADDR", f"http://127.0.0.1:{dashboard}")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip()


def _job_api_up(dashboard: int, env: dict[str, str]) -> bool:
    code = "from ray.util.state import list_nodes; print(len(list_nodes(address='ADDR')))"
    return _state(dashboard, env, code) == "1"


def _gpu_nodes(dashboard: int, env: dict[str, str]) -> int:
    code = (
        "from ray.util.state import list_nodes\n"
        "print(sum(1 for n in list_nodes(address='ADDR')\n"
        "          if n.resources_total.get('GPU') and n.state == 'ALIVE'))"
    )
    out = _state(dashboard, env, code)
    return int(out) if out.isdigit() else 0


@pytest.mark.parametrize(("num_gpus", "actors"), [("1", 1), ("0.5", 2)])
def test_job_submission_places_model_on_gpu_node_and_decode_on_cpu(
    cluster, tmp_path, make_image, num_gpus, actors
) -> None:  # type: ignore[no-untyped-def]
    """The model actors go to the GPU node, decode and write tasks to the CPU node; with
    ``--num-gpus 0.5``, two actors share the node's one GPU."""
    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(make_image((50 + i, 40), seed=i))
    env = dict(os.environ) | cluster
    env.pop("RAY_ADDRESS", None)
    submission = f"placement-{num_gpus}-{actors}"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster["dashboard"],
            "--submission-id",
            submission,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "-m",
            "jobs.embed_images",
            "--input",
            str(photos),
            "--output",
            str(output),
            "--weights",
            "random",
            "--num-gpus",
            num_gpus,
            "--concurrency",
            str(actors),
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    # The job's log is spared Ray core's line about Ray Data's actor constructor arguments.
    assert "constructor arguments in the object store" not in submit.stdout + submit.stderr

    code = (  # this job's actors and tasks: the cluster ran others before it
        "from ray.job_submission import JobSubmissionClient\n"
        "from ray.util.state import list_actors, list_nodes, list_tasks\n"
        f"job = JobSubmissionClient('ADDR').get_job_info('{submission}').job_id\n"
        "nodes = {n.node_id: ('gpu' if n.resources_total.get('GPU') else 'cpu')\n"
        "         for n in list_nodes(address='ADDR')}\n"
        "for a in list_actors(address='ADDR', limit=1000, detail=True):\n"
        "    if 'ResNet50Embedder' in a.class_name and a.job_id == job:\n"
        "        print('model', nodes.get(a.node_id), a.required_resources.get('GPU'))\n"
        "for t in list_tasks(address='ADDR', limit=10000):\n"
        "    if t.job_id == job and t.name in ('MapBatches(decode_batch)',\n"
        "                                      'MapBatches(write_files)'):\n"
        "        print(t.name, nodes.get(t.node_id))\n"
    )
    dashboard = int(cluster["dashboard"].rsplit(":", 1)[1])
    lines = _state(dashboard, env, code).splitlines()
    assert lines.count(f"model gpu {float(num_gpus)}") == actors, lines  # one GPU, shared
    placements = set(lines)
    assert placements == {
        f"model gpu {float(num_gpus)}",
        "MapBatches(decode_batch) cpu",
        "MapBatches(write_files) cpu",  # the writer tasks
    }, placements

    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[0].counts.embedded == 5
    table = read_embeddings(str(output))
    assert sorted(table["uri"].to_pylist()) == sorted(str(photos / f"p{i}.jpg") for i in range(5))
    assert sorted(
        zip(table["original_width"].to_pylist(), table["original_height"].to_pylist(), strict=True)
    ) == [(50 + i, 40) for i in range(5)]


def test_case_1_kuberays_submitter_runs_the_nightly_rayjob_on_a_token_auth_head(
    cluster, tmp_path, make_image
) -> None:  # type: ignore[no-untyped-def]
    """The nightly RayJob of infra/kuberay, as KubeRay's submitter pod runs it: its command line
    through `bash -ce`, with exactly that pod's environment (the token only because the RayJob
    asks for token auth), against a head with token auth. The job must end committed.

    Replaced here: the bucket URLs by local folders, `--weights imagenet` by `random` (no
    weights download on this machine); the rest of the entrypoint is as written."""
    from tests.kuberay import KUBERAY, kustomize, submit_command, submitter_env

    (rayjob,) = [d for d in kustomize(KUBERAY / "nightly") if d["kind"] == "RayJob"]
    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(4):
        (photos / f"n{i}.jpg").write_bytes(make_image((40 + i, 30), seed=i))
    entrypoint = rayjob["spec"]["entrypoint"]
    for url, local in (
        (r"s3://my-bucket/photos/", photos),
        (r"s3://my-bucket/embeddings/resnet50/", output),
    ):
        assert url in entrypoint
        entrypoint = entrypoint.replace(url, str(local))
    entrypoint = entrypoint.replace("--weights imagenet", "--weights random")
    rayjob["spec"]["entrypoint"] = entrypoint
    address, job_id = cluster["dashboard"].removeprefix("http://"), "embed-images-nightly-1"
    env = submitter_env(rayjob, address, job_id, cluster["RAY_AUTH_TOKEN"])
    env |= {"PATH": cluster["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "-ce", submit_command(rayjob, address, job_id)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", cluster["dashboard"], job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[0].run_id.endswith("-nightly")
    assert read_embeddings(str(output)).num_rows == 4
