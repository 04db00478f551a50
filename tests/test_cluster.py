"""A real cluster: `ray start --head`, a second node declaring a GPU, `ray job submit`; and
nodes lost mid-run.

The model actors must land on the GPU-declaring node (where torch sees no CUDA, they compute on
CPU, same code), the decode tasks on the CPU head, and the output must be right.

A node's raylet SIGKILLed while its model actor embeds: where the nodes left can take the work,
Ray retries the lost tasks and restarts the lost actor, and the run ends with each image once
(the actors that serve the driver live on the driver's node: pipeline.progress.driver_actor).
Where no node left can hold a model actor, the run drains and stops with exit 75, its
checkpoints kept (pipeline.nodes); once a node is back, the same command completes it, each
image once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.read import read_embeddings, read_manifest
from tests.raycluster import BIN, ROOT, Cluster, children, cmdline, ray_cluster

pytestmark = pytest.mark.slow
CPU_NODE, GPU_NODE = ["--num-cpus=2", "--num-gpus=0"], ["--num-cpus=0", "--num-gpus=1"]
# The GCS declares a node dead after this many missed health checks, this far apart (Ray's
# defaults take about 15 s).
FAST_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
IMAGES = 32  # for the runs that lose a node
MODEL_AT_WORK = "ResNet50Embedder)).submit"  # a model actor's title while it embeds a batch


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head (2 CPUs, no GPU) and a worker node (0 CPUs, 1 declared GPU), token auth on;
    one for this module's jobs, as a real cluster takes many."""
    with ray_cluster(CPU_NODE, GPU_NODE, **FAST_DEATH) as c:
        yield c


@pytest.mark.parametrize(("num_gpus", "actors"), [("0.5", 2)])
def test_job_submission_places_model_on_gpu_node_and_decode_on_cpu(
    cluster, tmp_path, make_image, num_gpus, actors
) -> None:  # type: ignore[no-untyped-def]
    """The model actors go to the GPU node, decode and write tasks to the CPU node; with
    ``--num-gpus 0.5``, two actors share the node's one GPU."""
    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(make_image((50 + i, 40), seed=i))
    env = dict(os.environ) | cluster.env
    env.pop("RAY_ADDRESS", None)
    submission = f"placement-{num_gpus}-{actors}"
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.dashboard,
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
        "    if a.class_name == 'ProgressCounter' and a.job_id == job:\n"
        "        print('counter', nodes.get(a.node_id))\n"
        "for t in list_tasks(address='ADDR', limit=10000):\n"
        "    if t.job_id == job and t.name in ('MapBatches(decode_batch)',\n"
        "                                      'MapBatches(write_files)'):\n"
        "        print(t.name, nodes.get(t.node_id))\n"
    )
    lines = cluster.state(code).splitlines()
    assert lines.count(f"model gpu {float(num_gpus)}") == actors, lines  # one GPU, shared
    placements = set(lines)
    assert placements == {
        f"model gpu {float(num_gpus)}",
        "MapBatches(decode_batch) cpu",
        "MapBatches(write_files) cpu",  # the writer tasks
        "counter cpu",  # the driver's own actor, on the driver's node, though it needs no CPU
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
    address, job_id = cluster.dashboard.removeprefix("http://"), "embed-images-nightly-1"
    env = submitter_env(rayjob, address, job_id, cluster.env["RAY_AUTH_TOKEN"])
    env |= {"PATH": cluster.env["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "-ce", submit_command(rayjob, address, job_id)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", cluster.dashboard, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    manifest = read_manifest(str(output))
    assert manifest is not None and manifest.runs[0].run_id.endswith("-nightly")
    assert read_embeddings(str(output)).num_rows == 4


def _photos(tmp_path: Path, make_image: Callable[..., bytes]) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(IMAGES):
        (photos / f"n{i:02d}.jpg").write_bytes(make_image((640 + i, 480), seed=i))
    return photos


def _run(photos: Path, output: Path, cluster: Cluster, *extra: str) -> subprocess.Popen[str]:
    env = os.environ | cluster.env | {"RAY_ADDRESS": cluster.address}
    return subprocess.Popen(
        [str(BIN / "embed-images"), "run", "--input", str(photos), "--output", str(output)]
        + ["--weights", "random", "--batch-size", "4", "--decode-batch-size", "4"]
        + ["--rows-per-file", "4", "--commit-every", "8", "--progress", "none"]
        + ["--model-threads", "1", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(
    cluster: Cluster,
    node: int,
    run: subprocess.Popen[str],
    work: tuple[str, ...],
    ready: Callable[[], bool] = lambda: True,
) -> threading.Thread:
    """In a thread: SIGKILL node ``node``'s raylet as soon as one of its workers runs one of
    ``work`` (a worker's title says what it runs) and ``ready()`` holds, unless ``run`` ends
    first; the thread's ``seen`` lists what the node's workers were running."""
    raylet = cluster.raylet(node)

    def kill() -> None:
        while run.poll() is None:
            titles = [cmdline(pid).strip() for pid in children(raylet)]
            if any(w in t for t in titles for w in work) and ready():
                killer.seen = [t for t in titles if t != "ray::IDLE"]  # type: ignore[attr-defined]
                os.kill(raylet, signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill, daemon=True)
    killer.seen = []  # type: ignore[attr-defined]
    killer.start()
    return killer


def _each_image_once(photos: Path, output: Path) -> None:
    uris = read_embeddings(str(output))["uri"].to_pylist()
    assert sorted(uris) == sorted(str(p) for p in photos.iterdir())


def test_a_worker_node_lost_mid_run_loses_no_image(cluster, tmp_path, make_image) -> None:  # type: ignore[no-untyped-def]
    """A CPU node joins, and is killed while it decodes or embeds; the nodes left can take
    the work: the run ends committed, each image once."""
    photos, output = _photos(tmp_path, make_image), tmp_path / "out"
    cluster.add_node(f"--address={cluster.address}", *CPU_NODE)
    node, alive = len(cluster.nodes) - 1, cluster.alive_nodes()
    # Two model actors of half a CPU: the head has room for one lost on the CPU node.
    run = _run(photos, output, cluster, "--concurrency", "2", "--model-cpus", "0.5")
    killer = _kill_when(cluster, node, run, ("decode_batch", MODEL_AT_WORK))
    _, err = run.communicate(timeout=400)
    killer.join()
    assert killer.seen, "the CPU node never decoded nor embedded"  # type: ignore[attr-defined]
    assert cluster.alive_nodes() == alive - 1  # the GCS saw the node go
    assert run.returncode == 0, err[-3000:]
    _each_image_once(photos, output)
    manifest = read_manifest(str(output))
    assert manifest is not None and [r.counts.embedded for r in manifest.runs] == [IMAGES]


def test_the_only_model_node_lost_stops_the_run_and_keeps_its_checkpoints(
    cluster, tmp_path, make_image
) -> None:  # type: ignore[no-untyped-def]
    """No node left has a GPU for the model actor Ray would restart, and Ray Data would wait
    for it forever: the run drains once the model stage has done nothing for
    --lost-node-wait, keeps what was written and exits 75; a rerun, once a GPU node is back,
    embeds only the rest."""
    photos, output = _photos(tmp_path, make_image), tmp_path / "out"
    knobs = ["--num-gpus", "1", "--lost-node-wait", "3", "--drain-seconds", "2"]
    run = _run(photos, output, cluster, *knobs)
    # Once a checkpoint is committed, so that there is something to keep.
    killer = _kill_when(cluster, 1, run, (MODEL_AT_WORK,), (output / "_manifest.json").exists)
    _, err = run.communicate(timeout=400)
    killer.join()
    assert killer.seen, err[-3000:]  # type: ignore[attr-defined]
    assert run.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("embed-images: stopped after "), last
    assert "lost Ray node " in last and "(--lost-node-wait 3)" in last, last
    manifest = read_manifest(str(output))
    assert manifest is not None
    (first,) = manifest.runs
    kept = first.counts.embedded
    assert first.status == "checkpointed" and 8 <= kept < IMAGES, first
    assert f"kept {kept} images" in last, last

    cluster.add_node(f"--address={cluster.address}", *GPU_NODE)  # the cluster is whole again
    rerun = _run(photos, output, cluster, "--num-gpus", "1")
    _, err = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, err[-3000:]
    _each_image_once(photos, output)
    manifest = read_manifest(str(output))
    assert manifest is not None
    assert [r.counts.embedded for r in manifest.runs] == [kept, IMAGES - kept]
