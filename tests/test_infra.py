"""infra/: every YAML parses, names real entry points and the image the Dockerfile builds; the
cluster-launcher config passes Ray's own schema check; the Dockerfile installs the project."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE = "embed-images:0.1.0"


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} not pinned in constraints.txt")


def _walk(node: object):  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _entry_module(command: str) -> str:
    words = shlex.split(command)
    return words[words.index("-m") + 1]


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    assert yaml.safe_load(path.read_text())


def test_kuberay_manifests_name_our_image_entry_points_and_ray_version() -> None:
    ray_version = _constraint("ray")
    kinds = {}
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        kinds[doc["kind"]] = doc
        images = {c["image"] for n in _walk(doc) for c in n.get("containers", [])}
        assert images == {IMAGE}, path
        versions = {n["rayVersion"] for n in _walk(doc) if "rayVersion" in n}
        assert versions == {ray_version}, path
        for node in _walk(doc):
            if "entrypoint" in node:
                module = _entry_module(node["entrypoint"])
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
            for container in node.get("containers", []):
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE") == "token", path
            if "serviceType" in node:
                assert node["serviceType"] == "ClusterIP", (
                    "the dashboard must not leave the cluster"
                )
    assert set(kinds) == {"RayCluster", "RayJob", "RayCronJob"}
    job = kinds["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0
    groups = {g["groupName"]: g for g in kinds["RayCluster"]["spec"]["workerGroupSpecs"]}
    assert groups["gpu-model"]["rayStartParams"]["num-gpus"] == "1"
    assert all(g["minReplicas"] <= g["maxReplicas"] for g in groups.values())
    cron = kinds["RayCronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5
    assert _entry_module(cron["jobTemplate"]["entrypoint"]) == "jobs.nightly"


def test_cluster_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert {"head", "cpu-decode", "gpu-model"} <= set(types)
    assert types["cpu-decode"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["idle_timeout_minutes"] > 0 and config["docker"]["image"].endswith(
        IMAGE.split("/")[-1]
    )
    assert not config["setup_commands"]  # code and weights come in the image
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    # And the check is real: a field the schema does not know is refused.
    config["available_node_types"]["head"]["no_such_field"] = 1
    with pytest.raises(Exception, match="no_such_field"):
        validate_config(prepare_config(config))


def test_dockerfile_installs_the_project_with_its_pins_and_checks_the_weights() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    for needed in ("pyproject.toml", "constraints.txt", "pipeline", "jobs"):
        assert needed in copied, needed
    assert re.search(r"pip install [^\n]*-c constraints\.txt \.", text)
    assert "sha256sum -c" in text
    from pipeline.weights import PUBLISHED_SHA256

    pinned = re.search(r"^ARG RESNET50_SHA256=([0-9a-f]{64})$", text, re.M)
    assert pinned and pinned.group(1) == PUBLISHED_SHA256["resnet50-11ad3fa6.pth"]
    assert "RAY_AUTH_MODE=token" in text
    python = re.search(r"python3\.(\d+)", text)
    assert python and f">=3.{python.group(1)}" in (ROOT / "pyproject.toml").read_text()
    # What pyproject declares is what constraints pins, so the image gets the tested versions.
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
        assert _constraint(name.lower())
