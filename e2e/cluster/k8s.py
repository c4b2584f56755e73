"""Helpers of the cluster suite: image references, the kustomize overlay that installs the
operator with a given image, and a thin kubectl wrapper with polling."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_BASE = REPO / "charts" / "kustomize" / "base"
EXAMPLES = REPO / "charts" / "switchyard" / "examples"
OPERATOR_NAMESPACE = "switchyard-system"
OPERATOR_DEPLOYMENT = "switchyard-operator"
# The image name the kustomize base uses; overlays replace it with `images:`.
BASE_OPERATOR_IMAGE = "switchyard-operator"
# Upper bound of every wait of the cluster suite, in seconds.
TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "300"))


@dataclass(frozen=True)
class ImageRef:
    """An image reference split the way kustomize's `images:` transformer wants it."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "ImageRef":
        ref = ref.strip()
        if not ref or any(c.isspace() for c in ref):
            raise ValueError(f"failed to parse image reference {ref!r}")
        name, digest = ref, None
        if "@" in ref:
            name, digest = ref.split("@", 1)
            if not digest.startswith("sha256:"):
                raise ValueError(f"failed to parse image digest in {ref!r}")
        tag = None
        # A colon after the last slash is a tag; one before it is a registry port.
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = name.rsplit(":", 1)
        if not name or tag == "":
            raise ValueError(f"failed to parse image reference {ref!r}")
        return cls(name, tag, digest)

    def kustomize_entry(self, original: str) -> dict:
        entry: dict[str, str] = {"name": original, "newName": self.name}
        if self.digest:
            entry["digest"] = self.digest
        else:
            entry["newTag"] = self.tag or "latest"
        return entry


def write_operator_overlay(directory: Path, operator_image: str) -> Path:
    """A kustomization that installs charts/kustomize/base with the operator image replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZE_BASE, directory)],
        "images": [ImageRef.parse(operator_image).kustomize_entry(BASE_OPERATOR_IMAGE)],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


def example_objects(name: str, switch_image: str) -> list[dict]:
    """The Secrets and the BankSwitch of one shipped example, with the switch image set."""
    flavour = name
    objs = [d for d in yaml.safe_load_all((EXAMPLES / f"secrets-{flavour}.yaml").read_text()) if d]
    bsw = yaml.safe_load((EXAMPLES / f"bankswitch-{flavour}.yaml").read_text())
    bsw["spec"]["image"] = switch_image
    return objs + [bsw]


class KubectlError(AssertionError):
    """kubectl failed; the message carries its stderr."""


class Kubectl:
    """Runs kubectl against $KUBECONFIG; every call is bounded in time."""

    def __init__(self, timeout: float = 120):
        self.timeout = timeout

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        out = subprocess.run(
            ["kubectl", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
        )
        if check and out.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, objects: list[dict], namespace: str | None = None) -> None:
        args = ["apply", "--server-side", "--field-manager=switchyard-e2e", "-f", "-"]
        if namespace:
            args = ["-n", namespace, *args]
        self.run(*args, stdin=yaml.safe_dump_all(objects, sort_keys=False))

    def get_or_none(self, *args: str) -> Any:
        out = self.run("get", *args, "-o", "json", "--ignore-not-found", check=False)
        if out.returncode != 0:
            raise KubectlError(out.stderr)
        return json.loads(out.stdout) if out.stdout.strip() else None


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 3.0) -> Any:
    """Poll `probe` until it returns something truthy; fail with the last thing it saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except KubectlError as e:  # transient API errors while objects come and go
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last}"
            )
        time.sleep(interval)


def condition(obj: dict | None, ctype: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def owned_by(items: list[dict], uid: str) -> list[dict]:
    return [
        o
        for o in items
        if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])
    ]
