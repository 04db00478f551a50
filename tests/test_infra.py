"""infra/, checked as a user would deploy it, without a cluster.

- KubeRay: what ``kubectl apply -k`` creates (tests/kuberay.py) validated against KubeRay's CRD
  schemas (1.6.0, 1.7.0, master); each entrypoint run through the submitter pod's ``bash -ce``
  with exactly its environment (the real submit to a token-auth head is in test_cluster.py); the
  nightly launcher run against a stand-in Kubernetes API.
- Cluster launcher: Ray's own ``prepare_config`` / ``validate_config`` and its AMI and security
  group steps; the head start command run here with the config's file mounts in place.
- Dockerfile: layer order, user, compiler, base, ignore file. (No Docker engine runs here.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kuberay import (
    CRD_VERSIONS,
    KUBERAY,
    crd_validator,
    kustomize,
    submit_command,
    submitter_env,
    walk,
)
from tests.raycluster import free_ports

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
DEPLOYMENTS = ("nightly", "cluster")
LAUNCH = KUBERAY / "nightly" / "launch.py"


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} not pinned in constraints.txt")


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _cluster_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every RayClusterSpec: a RayCluster's spec, a RayJob's rayClusterSpec."""
    return [d["spec"] for d in _of_kind(docs, "RayCluster")] + [
        d["spec"]["rayClusterSpec"] for d in _of_kind(docs, "RayJob")
    ]


def _pod_specs(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


@pytest.fixture(scope="module")
def deployed() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(KUBERAY / name) for name in DEPLOYMENTS}


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    assert all(doc for doc in yaml.safe_load_all(path.read_text()))


# -- KubeRay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", CRD_VERSIONS)
def test_ray_resources_validate_against_kuberays_crds(deployed, version) -> None:  # type: ignore[no-untyped-def]
    """Every RayJob and RayCluster, as kustomize renders it, is what KubeRay's CRD accepts,
    unknown fields refused (kubectl's default strict field validation)."""
    checked = 0
    for docs in deployed.values():
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                errors = list(crd_validator(version, doc["kind"]).iter_errors(doc))
                assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
                checked += 1
    assert checked == 2
    # And the check is real: a misplaced field is refused.
    job = json.loads(json.dumps(_of_kind(deployed["nightly"], "RayJob")[0]))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["serviceAcount"] = "x"
    assert list(crd_validator(version, "RayJob").iter_errors(job))


def test_case_1_entrypoints_keep_their_arguments_through_the_submitter_shell(
    deployed, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """KubeRay runs `ray job submit ... -- ENTRYPOINT` through `bash -ce` in the submitter pod,
    whose environment holds only what KubeRay puts there: the arguments `ray job submit` gets
    must be the literal input, output and weights."""
    health = _serve(lambda method, path, body, headers: (200, b"success"))
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ray").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if sys.argv[1:3] == ['job', 'status'] else 0)\n"
    )
    (fake / "ray").chmod(0o755)
    (rayjob,) = _of_kind(deployed["nightly"], "RayJob")
    dashboard = f"127.0.0.1:{health.server_port}"
    env = submitter_env(rayjob, dashboard, "nightly-1", "secret") | {
        "PATH": f"{fake}:{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", "-ce", submit_command(rayjob, dashboard, "nightly-1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    submit = [
        c for c in map(json.loads, calls.read_text().splitlines()) if c[:2] == ["job", "submit"]
    ]
    (argv,) = submit
    entry = argv[argv.index("--") + 1 :]
    assert entry[:3] == ["python", "-m", "jobs.nightly"], entry
    options = dict(zip(entry[3::2], entry[4::2], strict=False))
    assert re.fullmatch(r"s3://[^/]+/.+", options["--input"]), options
    assert re.fullmatch(r"s3://[^/]+/.+", options["--output"]), options
    assert options["--weights"] == "imagenet", options
    assert all(value for value in entry), entry  # no argument expanded to nothing
    assert (ROOT / "jobs" / "nightly.py").is_file()


def test_case_2_token_auth_is_kuberays_authoptions(deployed) -> None:  # type: ignore[no-untyped-def]
    """Token auth through `authOptions`, so that KubeRay gives the token to the head, the
    workers, the autoscaler and the submitter pod; nothing set by hand on a container."""
    for name, docs in deployed.items():
        specs = _cluster_specs(docs)
        assert specs, name
        for cluster in specs:
            assert cluster["authOptions"] == {"mode": "token"}, name
            assert cluster["rayVersion"] == _constraint("ray")  # KubeRay needs >= 2.52 for it
        for node in walk(docs):
            for container in node.get("containers", []):
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (name, container)
    # The submitter pod gets the token only this way (KubeRay's utils.IsAuthEnabled).
    (rayjob,) = _of_kind(deployed["nightly"], "RayJob")
    assert submitter_env(rayjob, "h:8265", "j", "secret")["RAY_AUTH_TOKEN"] == "secret"
    # The operating guide names KubeRay's Secret key, auth_token.
    guide = (ROOT / "docs" / "operating.md").read_text()
    assert "auth_token" in guide and "key: token" not in guide


def test_case_3_the_schedule_runs_on_a_default_install_one_night_at_a_time(deployed) -> None:  # type: ignore[no-untyped-def]
    """A plain CronJob (no KubeRay feature gate), a time zone, never two nights at once, missed
    nights not started late; its launcher may read the template and create RayJobs."""
    docs = deployed["nightly"]
    for path in INFRA.rglob("*.yaml"):  # KubeRay's RayCronJob needs a feature gate, off by default
        assert all(d.get("kind") != "RayCronJob" for d in yaml.safe_load_all(path.read_text()))
    (cron,) = _of_kind(docs, "CronJob")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["timeZone"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] <= 6 * 3600
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][-1].endswith("/launch.py")
    fields = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }
    assert fields["EMBED_JOB_NAME"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert fields["EMBED_JOB_UID"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    (template,) = _of_kind(docs, "RayJob")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMBED_TEMPLATE"] == template["metadata"]["name"]
    assert template["spec"]["suspend"] is True  # a template only: it never runs itself
    # The launcher script is what the ConfigMap mounts.
    (config_map,) = _of_kind(docs, "ConfigMap")
    assert config_map["data"]["launch.py"] == LAUNCH.read_text()
    assert {v["configMap"]["name"] for v in pod["volumes"]} == {config_map["metadata"]["name"]}
    # RBAC: the pod's account may get the template and create RayJobs, in its namespace.
    (role,) = _of_kind(docs, "Role")
    (binding,) = _of_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {s["name"] for s in binding["subjects"]} == {pod["serviceAccountName"]}
    allowed = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert {("ray.io", "rayjobs", "get"), ("ray.io", "rayjobs", "create")} <= allowed


def test_case_4_ray_pods_run_as_the_account_that_reaches_s3(deployed) -> None:  # type: ignore[no-untyped-def]
    for name, docs in deployed.items():
        (account,) = [
            d for d in _of_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "embed-images"
        ]
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
            "arn:aws:iam::"
        )
        for cluster in _cluster_specs(docs):
            for pod in _pod_specs(cluster):
                assert pod["serviceAccountName"] == "embed-images", name


def test_case_5_one_setting_names_the_registry_image_everywhere(deployed) -> None:  # type: ignore[no-untyped-def]
    settings = yaml.safe_load((KUBERAY / "settings" / "kustomization.yaml").read_text())
    (image,) = settings["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    registry = image["newName"].split("/")[0]
    assert "." in registry or ":" in registry, "a registry host, not Docker Hub's library"
    for name, docs in deployed.items():
        images = {c["image"] for n in walk(docs) for c in n.get("containers", [])}
        assert images == {expected}, name
    assert (
        image["newTag"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    )
    cluster = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == expected


def test_rayjob_retries_and_gpu_pods_tolerate_gpu_taints(deployed) -> None:  # type: ignore[no-untyped-def]
    (rayjob,) = _of_kind(deployed["nightly"], "RayJob")
    spec = rayjob["spec"]
    assert spec["backoffLimit"] >= 1  # a retry is safe: checkpoints and the date guard
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    for docs in deployed.values():
        for cluster in _cluster_specs(docs):
            assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
            for group in cluster["workerGroupSpecs"]:
                pod = group["template"]["spec"]
                gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                if gpus:
                    assert group["rayStartParams"]["num-gpus"] == gpus
                    assert {
                        "key": "nvidia.com/gpu",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                    } in pod["tolerations"]


# -- the nightly launcher, against a stand-in Kubernetes API -----------------------------------


def _serve(answer) -> http.server.HTTPServer:  # type: ignore[no-untyped-def]
    """A local HTTP server: ``answer(method, path, json_body, headers)`` gives (status, body)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, data = answer(method, self.path, body, self.headers)
            payload = data if isinstance(data, bytes) else json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802
            self._reply("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._reply("POST")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class FakeKubernetes:
    """The few calls launch.py makes: GET and POST RayJobs. Each GET of the night's RayJob
    moves it one state on through ``states``; ``fail`` lists statuses to answer first."""

    def __init__(self, template: dict[str, Any], states: list[tuple[str, str]]) -> None:
        self.template, self.states, self.fail = template, states, [503, 503]
        self.created: dict[str, Any] = {}
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, method, path, body, headers):  # type: ignore[no-untyped-def]
        self.calls.append((method, path, headers.get("Authorization", "")))
        if self.fail:
            return self.fail.pop(0), {}
        base = "/apis/ray.io/v1/namespaces/nightly-ns/rayjobs"
        if method == "GET" and path == f"{base}/{self.template['metadata']['name']}":
            return 200, self.template
        if method == "POST" and path == base:
            name = body["metadata"]["name"]
            if name in self.created:
                return 409, {"reason": "AlreadyExists"}
            self.created[name] = body
            return 201, body
        if method == "GET" and path.startswith(f"{base}/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.created:
                return 404, {}
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return 200, self.created[name] | {
                "status": {"jobDeploymentStatus": state[0], "jobStatus": state[1]}
            }
        return 404, {}


def _launch(  # type: ignore[no-untyped-def]
    fake: FakeKubernetes, tmp_path: Path, template: str | None = None
):
    job = "embed-images-nightly-29391120"
    server = _serve(fake)
    account = tmp_path / "sa"
    account.mkdir(exist_ok=True)
    (account / "token").write_text("pod-token\n")
    env = {
        "PATH": os.environ["PATH"],
        "EMBED_API_URL": f"http://127.0.0.1:{server.server_port}",
        "EMBED_SERVICE_ACCOUNT_DIR": str(account),
        "EMBED_TEMPLATE": template or fake.template["metadata"]["name"],
        "EMBED_JOB_NAME": job,
        "EMBED_JOB_UID": "9c1d-uid",
        "EMBED_NAMESPACE": "nightly-ns",
        "EMBED_POLL_SECONDS": "0.01",
    }
    try:
        return subprocess.run(
            [sys.executable, str(LAUNCH)], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()


@pytest.fixture
def template(deployed) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    (rayjob,) = _of_kind(deployed["nightly"], "RayJob")
    return json.loads(json.dumps(rayjob))


def test_launcher_creates_the_nights_rayjob_owned_by_its_job_and_waits(template, tmp_path) -> None:  # type: ignore[no-untyped-def]
    states = [("Initializing", ""), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
    fake = FakeKubernetes(template, list(states))
    done = _launch(fake, tmp_path)
    assert done.returncode == 0, done.stderr
    (created,) = fake.created.values()
    assert created["metadata"]["name"] == "embed-images-nightly-29391120"
    assert created["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "embed-images-nightly-29391120",
            "uid": "9c1d-uid",
        }
    ]
    assert created["spec"] == template["spec"] | {"suspend": False}
    assert all(auth == "Bearer pod-token" for _, _, auth in fake.calls)
    assert "trying again" in done.stderr  # the two 503s were waited out
    assert "Complete, job SUCCEEDED" in done.stdout


def test_launcher_waits_for_the_rayjob_a_lost_pod_created(template, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = FakeKubernetes(template, [("Running", "RUNNING"), ("Complete", "SUCCEEDED")])
    fake.created["embed-images-nightly-29391120"] = {"metadata": {}, "spec": {}}
    done = _launch(fake, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "exists already: waiting" in done.stdout
    assert [m for m, p, _ in fake.calls if m == "POST"] == ["POST"]


@pytest.mark.parametrize(
    "state, status", [(("Failed", "FAILED"), 3), (("ValidationFailed", ""), 3)]
)
def test_launcher_exit_status_fails_the_job_when_the_rayjob_failed(
    template, tmp_path, state, status
) -> None:  # type: ignore[no-untyped-def]
    done = _launch(FakeKubernetes(template, [state]), tmp_path)
    assert done.returncode == status, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("launch: RayJob ")


def test_launcher_says_what_to_fix_when_the_template_is_missing(template, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = FakeKubernetes(template, [("Complete", "SUCCEEDED")])
    done = _launch(fake, tmp_path, template="no-such-template")
    assert done.returncode == 2
    assert "cannot read the template RayJob" in done.stderr.strip().splitlines()[-1]


def test_cronjob_fails_its_job_at_once_on_the_launchers_final_statuses(deployed) -> None:  # type: ignore[no-untyped-def]
    (cron,) = _of_kind(deployed["nightly"], "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    assert fail["onExitCodes"] == {"containerName": "launch", "operator": "In", "values": [2, 3]}
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    text = LAUNCH.read_text()
    assert "return 3" in text and "return 2" in text


# -- the cluster launcher (AWS) ---------------------------------------------------------------


@pytest.fixture
def launcher_config() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_cluster_launcher_config_passes_rays_schema(launcher_config) -> None:  # type: ignore[no-untyped-def]
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert {"head", "cpu-decode", "gpu-model"} <= set(types)
    assert types["cpu-decode"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["idle_timeout_minutes"] > 0
    assert not config["setup_commands"]  # code and weights come in the image
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    # And the check is real: a field the schema does not know is refused.
    config["available_node_types"]["head"]["no_such_field"] = 1
    with pytest.raises(Exception, match="no_such_field"):
        validate_config(prepare_config(config))


def test_case_6_launcher_nodes_get_an_ami_a_registry_login_and_a_closed_ssh_port(
    launcher_config,
) -> None:  # type: ignore[no-untyped-def]
    """Ray's own AWS steps, run on the config: its default AMI (an old Deep Learning AMI) is not
    used, nor its default security group (SSH from 0.0.0.0/0); Docker logs in to the image's
    registry before the pull."""
    from ray.autoscaler._private.aws import config as aws
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(launcher_config)
    aws._check_ami(config)
    for name, node in config["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert image not in aws.DEFAULT_AMI.values(), name
        assert re.fullmatch(
            r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-\S+",
            image,
        ), image
        assert node["node_config"]["SecurityGroupIds"], name
    before = json.dumps(config, sort_keys=True)
    assert aws._configure_security_group(config) is config  # user groups: nothing made
    assert json.dumps(config, sort_keys=True) == before
    registry = config["docker"]["image"].split("/")[0]
    login = " ".join(config["initialization_commands"])
    assert f"docker login --username AWS --password-stdin {registry}" in login
    assert "aws ecr get-login-password" in login


def test_case_6_launcher_roles_hold_what_the_launcher_and_runs_need(launcher_config) -> None:  # type: ignore[no-untyped-def]
    def actions(path: str) -> set[str]:
        policy = json.loads((INFRA / "aws" / path).read_text())
        found = set()
        for statement in policy["Statement"]:
            listed = statement["Action"]
            found |= {listed} if isinstance(listed, str) else set(listed)
        return found

    head, node = actions("iam-head-policy.json"), actions("iam-node-policy.json")
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
        "iam:PassRole",
        "ssm:GetParameters",
    } <= head
    assert {
        "ecr:GetAuthorizationToken",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "s3:DeleteObject",
    } <= node
    head_policy = json.loads((INFRA / "aws" / "iam-head-policy.json").read_text())
    (passing,) = [s for s in head_policy["Statement"] if "iam:PassRole" in s["Action"]]
    worker_profiles = {
        t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        for n, t in launcher_config["available_node_types"].items()
        if n != "head"
    }
    assert {passing["Resource"].rsplit("/", 1)[1]} == worker_profiles  # role named as profile


@pytest.mark.slow
def test_case_6_head_start_command_starts_with_the_file_mounts_in_place(
    launcher_config, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The head's start command, run here as the launcher runs it in the container: the file
    mounts copied to their targets (~ is the container's home), the image's and run_options'
    environment. Ray 2.60 refuses `ray start` in token mode with no token; with the mounted token
    the head starts and its job API answers only with that token. (`ray stop` is left out: it
    would stop every Ray on this machine. Ports and the temp dir are moved off the defaults.)"""
    home = tmp_path / "home"
    home.mkdir()
    local_token = "f" * 64
    for target, source in launcher_config["file_mounts"].items():
        assert source == "~/.ray/auth_token"  # the launching user's token file
        destination = home / target.removeprefix("~/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(local_token)
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(launcher_config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"HOME": str(home), "PATH": f"{BIN}:{env['PATH']}"}
    for option in launcher_config["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] == "--env":
            key, value = words[1].split("=", 1)
            env[key] = value
    (start,) = [c for c in launcher_config["head_start_ray_commands"] if c.startswith("ray start")]
    port, dashboard = free_ports(2)
    temp = Path(f"/tmp/rh{os.getpid()}")
    extra = [
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        "--num-cpus=1",
        "--block",
    ]
    head = subprocess.Popen(
        shlex.split(start.replace("--port=6379", "")) + extra,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        probe = (
            "from ray.job_submission import JobSubmissionClient\n"
            f"print(len(JobSubmissionClient('http://127.0.0.1:{dashboard}').list_jobs()))\n"
        )
        deadline, answered = time.time() + 120, None
        while time.time() < deadline and head.poll() is None:
            answered = subprocess.run(
                [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
            )
            if answered.returncode == 0:
                break
            time.sleep(2)
        assert head.poll() is None, head.stdout.read() if head.stdout else ""
        assert answered is not None and answered.returncode == 0, answered and answered.stderr
        # Without the token, the job API refuses.
        stranger = env | {"HOME": str(tmp_path)}
        refused = subprocess.run(
            [sys.executable, "-c", probe], env=stranger, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


# -- the image --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_case_8_dockerfile_layers_go_from_pins_to_weights_to_code() -> None:
    steps = _instructions()
    copies = [(i, args) for i, (op, args) in enumerate(steps) if op == "COPY"]
    first_copy_index, first_copy = copies[0]
    assert set(first_copy.split()[:-1]) == {"pyproject.toml", "constraints.txt"}
    install = next(
        i for i, (op, a) in enumerate(steps) if op == "RUN" and "-c constraints.txt -r" in a
    )
    weights = next(i for i, (op, a) in enumerate(steps) if op == "RUN" and "sha256sum -c" in a)
    code = [i for i, args in copies if re.search(r"\b(pipeline|jobs|README\.md)\b", args)]
    assert first_copy_index < install < weights < min(code)
    assert any("pip install --no-deps ." in a for _, a in steps[min(code) :])
    # What pyproject declares is what constraints pins, so the image gets the tested versions.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["cluster"]:
        assert _constraint(re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower())
    # The install line reads those two lists, the same way this test does.
    assert "p['dependencies'] + p['optional-dependencies']['cluster']" in steps[install][1]


def test_case_8_dockerfile_base_user_and_ignore_file() -> None:
    steps = _instructions()
    (base,) = [a for op, a in steps if op == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\S+-base-ubuntu\S+", base), base  # not cudnn-runtime
    users = [a for op, a in steps if op == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0  # numeric: runAsNonRoot
    ignore = (INFRA / "Dockerfile.dockerignore").read_text()
    sent = _docker_context(ignore)
    assert ".venv/bin/python" not in sent and ".git/HEAD" not in sent
    assert "tests/test_infra.py" not in sent
    for needed in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "pipeline/cli.py",
        "jobs/nightly.py",
    ):
        assert needed in sent, needed
    assert "pipeline/__pycache__/cli.cpython-311.pyc" not in sent


def _docker_context(ignore: str) -> set[str]:
    """Which of a few representative paths Docker sends with these .dockerignore rules (the
    last matching rule wins; a rule matches a path or any folder above it; `!` re-includes)."""
    paths = [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_infra.py",
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "pipeline/cli.py",
        "jobs/nightly.py",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "bench/RESULTS.md",
    ]
    rules = [
        line.strip() for line in ignore.splitlines() if line.strip() and not line.startswith("#")
    ]
    sent = set()
    for path in paths:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if pattern.startswith("**/"):
                hit = any(fnmatch.fnmatch(p.split("/")[-1], pattern[3:]) for p in prefixes)
            else:
                hit = any(
                    fnmatch.fnmatch(p, pattern) and p.count("/") == pattern.count("/")
                    for p in prefixes
                )
            if hit:
                excluded = not negate
        if not excluded:
            sent.add(path)
    return sent


def test_case_7_the_image_can_build_tritons_helper_and_serve_the_launcher() -> None:
    """`--compile auto` on GPU actors: Triton compiles a C helper at run time, which needs a C
    compiler and the Python headers of the image's Python. The launcher's head needs boto3
    (its AWS node provider) and rsync (file mounts)."""
    apt = " ".join(a for op, a in _instructions() if op == "RUN" and "apt-get install" in a)
    python = re.search(r"python3\.(\d+)-venv", apt)
    assert python and f"python3.{python.group(1)}-dev" in apt.split()
    assert "gcc" in apt.split() and "libc6-dev" in apt.split()
    assert "rsync" in apt.split() and "openssh-client" in apt.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f">=3.{python.group(1)}" in project["requires-python"]
    assert any(r.startswith("boto3") for r in project["optional-dependencies"]["cluster"])


def test_dockerfile_checks_the_weights_it_bakes_in() -> None:
    from pipeline.weights import PUBLISHED_SHA256

    text = (INFRA / "Dockerfile").read_text()
    pinned = re.search(r"^ARG RESNET50_SHA256=([0-9a-f]{64})$", text, re.M)
    assert pinned and pinned.group(1) == PUBLISHED_SHA256["resnet50-11ad3fa6.pth"]
    assert "sha256sum -c" in text and "RAY_AUTH_MODE=token" in text
