"""Validates cert-manager Certificates against cert-manager's own schema, strictly.

The schema comes from `cloudcoil-models-cert-manager` (pydantic models generated from the
cert-manager 1.17 CRDs; pinned in e2e/requirements.txt): field names, types and enums such as
`usages`, `privateKey.algorithm` and `rotationPolicy`. The models ignore unknown fields by
default; every model is switched to `extra="forbid"` here, as the API server's strict field
validation would refuse them.

Usage: python validate_certificate.py FILE.yaml...  (documents of other kinds are skipped; exit
1 when a Certificate is invalid, 2 when a file has no Certificate at all, or the self-test —
a misspelt field must be refused — fails).
"""

from __future__ import annotations

import copy
import sys

import pydantic
import yaml
from cloudcoil.models.cert_manager import v1 as cm


def strict_models() -> None:
    models = [
        obj
        for obj in vars(cm).values()
        if isinstance(obj, type)
        and issubclass(obj, pydantic.BaseModel)
        and obj.__module__ == cm.__name__
    ]
    for model in models:
        model.model_config["extra"] = "forbid"
    for model in models:
        model.model_rebuild(force=True)


def errors(doc: dict) -> list[str]:
    try:
        cm.Certificate.model_validate(doc)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return []


def main(paths: list[str]) -> int:
    strict_models()
    certificates = [
        (path, doc)
        for path in paths
        for doc in yaml.safe_load_all(open(path))
        if doc and doc.get("apiVersion") == "cert-manager.io/v1" and doc.get("kind") == "Certificate"
    ]
    if not certificates:
        print("no cert-manager.io/v1 Certificate found", file=sys.stderr)
        return 2
    # self-test: the check must be strict enough to catch a misspelt field and a bad enum
    typo = copy.deepcopy(certificates[0][1])
    typo["spec"]["dnsName"] = typo["spec"].pop("dnsNames", [])
    bad_usage = copy.deepcopy(certificates[0][1])
    bad_usage["spec"]["usages"] = ["server authentication"]
    if not errors(typo) or not errors(bad_usage):
        print("self-test failed: a misspelt field or a bad usage was accepted", file=sys.stderr)
        return 2
    failed = 0
    for path, doc in certificates:
        found = errors(doc)
        for line in found:
            print(f"  {path} Certificate/{doc['metadata'].get('name')}: {line}")
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
