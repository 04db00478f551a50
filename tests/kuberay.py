"""What KubeRay and kustomize do with infra/kuberay, rebuilt from their sources so that tests can
run it without a Kubernetes cluster.

- :func:`kustomize`: the output of ``kubectl apply -k`` for the features our kustomizations use.
- :func:`crd_validator`: KubeRay's CRD schemas (tests/data/kuberay), closed to unknown fields as
  kubectl's default strict field validation is.
- :func:`submit_command` and :func:`submitter_env`: the submitter pod's ``bash -ce`` command line
  and environment (KubeRay v1.7.0, ray-operator/controllers/ray/common/job.go
  ``BuildJobSubmitCommand`` in K8sJobMode, and rayjob_controller.go
  ``configureSubmitterContainer``).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
CRD_VERSIONS = ("v1.6.0", "v1.7.0", "master")

# ray-operator/controllers/ray/utils/constant.go (v1.7.0)
HEALTH_COMMAND = (
    "python -c \"import urllib.request; r=urllib.request.urlopen('%s', timeout=%d); "
    "exit(0 if b'success' in r.read() else 1)\""
)
HEALTH_PATH = "api/gcs_healthz"
HEALTH_TIMEOUT = 10


def walk(node: object) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML tree, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k folder`` creates, for what our kustomizations use:
    ``resources`` (files), ``components`` (folders, applied to the whole result),
    ``configMapGenerator`` (``files``; kustomize adds a hash suffix to the name and to every
    reference, left out here), and ``images``, applied as kustomize's default image transformer
    does: to the ``image`` of every item of any ``containers`` or ``initContainers`` list, at any
    depth, custom resources included."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    images = list(spec.get("images", []))
    for component in spec.get("components", []):
        part = yaml.safe_load((folder / component / "kustomization.yaml").read_text())
        assert part["kind"] == "Component", component
        for resource in part.get("resources", []):
            docs += _docs(folder / component / resource)
        images += part.get("images", [])
    for resource in spec.get("resources", []):
        docs += _docs(folder / resource)
    for generator in spec.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}}
            | {"data": data}
        )
    for node in walk(docs):
        for key in ("containers", "initContainers"):
            for container in node.get(key) or [] if isinstance(node.get(key), list) else []:
                name = re.sub(r"(@.*|:[^/:]*)$", "", container["image"])
                for image in images:
                    if image["name"] == name:
                        container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _closed(schema: Any) -> Any:
    """A CRD schema as the API server applies it to ``kubectl apply``: an object's unknown
    fields are refused (unless the schema preserves them), int-or-string is either."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    if closed.get("x-kubernetes-int-or-string"):
        closed["type"] = ["integer", "string"]
    return closed


def crd_validator(version: str, kind: str) -> Any:
    """A jsonschema validator for ``kind`` (RayCluster, RayJob) in KubeRay ``version``."""
    import jsonschema

    path = ROOT / "tests" / "data" / "kuberay" / f"{version}.json.gz"
    schema = json.loads(gzip.decompress(path.read_bytes()))[kind]
    return jsonschema.Draft7Validator(_closed(schema))


def submit_command(rayjob: dict[str, Any], dashboard_url: str, job_id: str) -> str:
    """The submitter pod's command line (``bash -ce`` runs it) for a RayJob in K8sJobMode."""
    spec = rayjob["spec"]
    address = dashboard_url if dashboard_url.startswith("http://") else f"http://{dashboard_url}"
    health = HEALTH_COMMAND % (f"{address}/{HEALTH_PATH}", HEALTH_TIMEOUT)
    waiting = json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ...")
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo", waiting, ";"]
    cmd += ["sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1"]
    cmd += [";", "then", "ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":"))
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    if spec.get("metadata"):
        cmd += ["--metadata-json", json.dumps(json.dumps(spec["metadata"]))]
    cmd += ["--submission-id", job_id, "--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def submitter_env(
    rayjob: dict[str, Any], dashboard_url: str, job_id: str, token: str
) -> dict[str, str]:
    """The variables KubeRay gives the submitter container: PYTHONUNBUFFERED, the dashboard
    address, the submission id, and, only when the RayJob's cluster has
    ``authOptions.mode: token`` (``utils.IsAuthEnabled``), the token auth pair, whose token
    KubeRay takes from the cluster's Secret."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "RAY_DASHBOARD_ADDRESS": dashboard_url,
        "RAY_JOB_SUBMISSION_ID": job_id,
    }
    auth = (rayjob["spec"].get("rayClusterSpec") or {}).get("authOptions") or {}
    if auth.get("mode") == "token":
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return env
