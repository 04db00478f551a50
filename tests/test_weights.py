"""Weights: checked in the driver, loaded with weights_only, never silently replaced."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch

from pipeline import weights as weights_module
from pipeline.config import ConfigError, EmbedConfig
from pipeline.weights import WeightsError, load_weights


def test_random_weights_are_seeded_and_named() -> None:
    a, b, c = (
        load_weights("random", seed=0),
        load_weights("random", seed=0),
        load_weights("random", seed=1),
    )
    assert a.name == "random:seed=0" and a.sha256 == b.sha256 != c.sha256
    assert torch.equal(a.state_dict["conv1.weight"], b.state_dict["conv1.weight"])


def test_checkpoint_file_is_loaded_and_hashed(random_checkpoint: Path) -> None:
    digest = hashlib.sha256(random_checkpoint.read_bytes()).hexdigest()
    weights = load_weights(str(random_checkpoint), sha256=digest)
    assert weights.sha256 == digest and weights.name == str(random_checkpoint)
    saved = torch.load(random_checkpoint, weights_only=True)
    assert torch.equal(weights.state_dict["layer4.2.conv3.weight"], saved["layer4.2.conv3.weight"])


def test_sha256_mismatch_is_refused(random_checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match="not the expected"):
        load_weights(str(random_checkpoint), sha256="0" * 64)


def test_not_a_resnet50_state_dict_is_refused(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="not a ResNet50 state_dict"):
        load_weights(str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable torch state_dict"):
        load_weights(str(junk))


class _Payload:
    """A pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(WeightsError, match="not a loadable torch state_dict"):
        load_weights(str(path))


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(str(tmp_path / "absent.pth"))


def test_imagenet_download_failure_says_how_to_pass_a_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"--weights /path/to/resnet50-11ad3fa6\.pth"):
        load_weights("imagenet")


def test_imagenet_cache_with_wrong_hash_is_refused(
    tmp_path, monkeypatch, random_checkpoint
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(random_checkpoint.read_bytes())  # a ResNet50, but not the published one
    with pytest.raises(WeightsError, match="do not match their published hash prefix"):
        load_weights("imagenet")


def test_checkpoint_on_s3(random_checkpoint, s3_bucket, s3_endpoint) -> None:  # type: ignore[no-untyped-def]
    s3, bucket = s3_bucket
    s3.put(str(random_checkpoint), f"{bucket}/models/r50.pth")
    weights = load_weights(
        f"s3://{bucket}/models/r50.pth", storage_options={"endpoint_url": s3_endpoint}
    )
    assert weights.sha256 == hashlib.sha256(random_checkpoint.read_bytes()).hexdigest()


def _cache_as_imagenet(tmp_path, monkeypatch, data: bytes) -> str:  # type: ignore[no-untyped-def]
    """Put ``data`` in a temporary hub cache under a name that passes the 8-digit check."""
    from torchvision.models import ResNet50_Weights

    digest = hashlib.sha256(data).hexdigest()
    name = f"resnet50-{digest[:8]}.pth"
    monkeypatch.setattr(
        type(ResNet50_Weights.IMAGENET1K_V2.value),
        "url",
        property(lambda self: f"https://example.invalid/{name}"),
        raising=False,
    )
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    return name


def test_imagenet_full_sha256_is_always_checked(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A cached file that passes torchvision's 8-digit name check (named after its own
    # digest) but whose full sha256 is not the pinned one is refused, with no flag given.
    path = tmp_path / "w.pth"
    torch.save(dict(load_weights("random", seed=3).state_dict), path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    name = _cache_as_imagenet(tmp_path, monkeypatch, data)

    monkeypatch.setattr(weights_module, "PUBLISHED_SHA256", {name: "0" * 64})
    with pytest.raises(WeightsError, match="not the expected 0000"):
        load_weights("imagenet")
    monkeypatch.setattr(weights_module, "PUBLISHED_SHA256", {})
    with pytest.raises(WeightsError, match="no full sha256 is pinned"):
        load_weights("imagenet")
    assert load_weights("imagenet", sha256=digest).sha256 == digest  # an image's own pin

    monkeypatch.setattr(weights_module, "PUBLISHED_SHA256", {name: digest})
    assert load_weights("imagenet").sha256 == digest
    with pytest.raises(WeightsError, match="not the expected"):
        load_weights("imagenet", sha256="f" * 64)


def test_the_pinned_imagenet_hash_is_the_one_torchvision_names() -> None:
    from torchvision.models import ResNet50_Weights

    name = ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[-1]
    pinned = weights_module.PUBLISHED_SHA256[name]
    assert len(pinned) == 64 and pinned.startswith(name.rsplit("-", 1)[-1].split(".")[0])


def test_config_refuses_a_short_sha256() -> None:
    with pytest.raises(ConfigError, match="full 64-hex-digit"):
        EmbedConfig(input="a", output="b", weights="w.pth", weights_sha256="11ad3fa6")


def test_a_file_that_cannot_be_a_checkpoint_is_refused_from_its_first_bytes(
    tmp_path: Path, random_checkpoint: Path
) -> None:
    from pipeline.weights import sniff_checkpoint

    sniff_checkpoint(str(random_checkpoint))  # torch.save's zip format
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    sniff_checkpoint(str(legacy))  # the pickle format before torch 1.6
    sniff_checkpoint("imagenet")
    sniff_checkpoint("random")
    (tmp_path / "junk.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(WeightsError, match="not a torch checkpoint"):
        sniff_checkpoint(str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="not found"):
        sniff_checkpoint(str(tmp_path / "absent.pth"))
