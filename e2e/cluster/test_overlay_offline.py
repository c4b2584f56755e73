"""The parts of the cluster suite that need no cluster: image references are split the way
kustomize expects, and the install overlay renders offline with the image replaced."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from k8s import ImageRef, example_objects, write_operator_overlay


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("switchyard-operator:dev", ImageRef("switchyard-operator", "dev")),
        ("switchyard-operator", ImageRef("switchyard-operator", None)),
        ("localhost:5000/sy/op:1.2", ImageRef("localhost:5000/sy/op", "1.2")),
        ("localhost:5000/sy/op", ImageRef("localhost:5000/sy/op", None)),
        (
            "reg.example/op@sha256:" + "a" * 64,
            ImageRef("reg.example/op", None, "sha256:" + "a" * 64),
        ),
        (
            "reg.example/op:1@sha256:" + "b" * 64,
            ImageRef("reg.example/op", "1", "sha256:" + "b" * 64),
        ),
    ],
)
def test_image_references_split_like_kustomize_wants(ref, expected):
    assert ImageRef.parse(ref) == expected


@pytest.mark.parametrize("ref", ["", "op:", "op@md5:1", "two words"])
def test_bad_image_references_are_refused(ref):
    with pytest.raises(ValueError, match="failed to parse image"):
        ImageRef.parse(ref)


@pytest.mark.parametrize(
    "ref,image",
    [
        ("kind.local/switchyard-operator:e2e", "kind.local/switchyard-operator:e2e"),
        ("localhost:5000/op@sha256:" + "c" * 64, "localhost:5000/op@sha256:" + "c" * 64),
    ],
)
def test_overlay_installs_the_base_with_the_given_operator_image(tmp_path, ref, image):
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed to render the overlay")
    overlay = write_operator_overlay(tmp_path / "overlay", ref)
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    deps = [d for d in docs if d["kind"] == "Deployment"]
    assert [c["image"] for c in deps[0]["spec"]["template"]["spec"]["containers"]] == [image]
    assert {"CustomResourceDefinition", "ClusterRole", "Namespace"} <= {d["kind"] for d in docs}


def test_example_objects_carry_the_switch_image():
    objs = example_objects("embedded", "kind.local/switchyard-switch:e2e")
    assert objs[-1]["kind"] == "BankSwitch"
    assert objs[-1]["spec"]["image"] == "kind.local/switchyard-switch:e2e"
    assert {o["kind"] for o in objs[:-1]} == {"Secret"}
