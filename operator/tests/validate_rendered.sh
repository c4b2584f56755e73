#!/usr/bin/env bash
# Validates what the operator produces against the real Kubernetes 1.33 OpenAPI schemas:
#   - the CRDs in crds/ as CustomResourceDefinitions (kubernetes-validate --strict);
#   - every object `switchyard-operator render` prints for each fixture (--strict);
#   - each fixture BankSwitch against the CRD's own openAPIV3Schema (python jsonschema).
#   - the cert-manager Certificate (spec.tls.issuerRef) against cert-manager's own schema
#     (validate_certificate.py, strict).
# ServiceMonitor and PrometheusRule are CRD-typed (monitoring.coreos.com) and have no schema in
# kubernetes-validate; it reports them (and the Certificate) as WARN and skips them there.
#
# Usage (from the repository root):
#   VENV=e2e/.venv bash operator/tests/validate_rendered.sh
# The venv needs kubernetes-validate, jsonschema, PyYAML and cloudcoil-models-cert-manager
# (e2e/requirements.txt pins them).
# OPERATOR_BIN overrides the binary (default: builds target/debug/switchyard-operator).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="${VENV:-e2e/.venv}"
py="$venv/bin/python"
kv="$venv/bin/kubernetes-validate"
k8s_version="${K8S_VERSION:-1.33}"
[[ -x "$kv" ]] || { echo "missing $kv: pip install -r e2e/requirements.txt into $venv" >&2; exit 2; }

bin="${OPERATOR_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build -q -p switchyard-operator --bin switchyard-operator
  bin="${CARGO_TARGET_DIR:-target}/debug/switchyard-operator"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

passed=0
failed=0
check() {
  local what="$1"; shift
  if "$@"; then
    passed=$((passed + 1)); echo "ok: $what"
  else
    failed=$((failed + 1)); echo "FAILED: $what"
  fi
}

for crd in crds/*.yaml; do
  check "CRD $crd" "$kv" --strict --quiet -k "$k8s_version" "$crd"
done

for fixture in operator/tests/fixtures/*.yaml; do
  base="$(basename "$fixture" .yaml)"
  "$bin" render -f "$fixture" > "$out/$base.yaml"
  check "render $base" "$kv" --strict --quiet -k "$k8s_version" "$out/$base.yaml"
  "$bin" render --no-monitoring-api -f "$fixture" > "$out/$base-nomon.yaml"
  check "render $base (no monitoring API)" "$kv" --strict --quiet -k "$k8s_version" "$out/$base-nomon.yaml"
  check "fixture $base against the CRD schema" "$py" - "$fixture" crds/bankswitches.switchyard.io.yaml <<'PY'
import sys, yaml, jsonschema
cr = yaml.safe_load(open(sys.argv[1]))
crd = yaml.safe_load(open(sys.argv[2]))
version = next(v for v in crd["spec"]["versions"] if v["name"] == cr["apiVersion"].split("/")[1])
schema = version["schema"]["openAPIV3Schema"]
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cr), key=str)
for e in errors:
    print(f"  {'/'.join(map(str, e.path))}: {e.message}")
sys.exit(1 if errors else 0)
PY
done

check "cert-manager Certificate against cert-manager's schema" \
  "$py" operator/tests/validate_certificate.py "$out/tls-cert-manager.yaml"

for fixture in operator/tests/fixtures/keyrotation/*.yaml; do
  base="$(basename "$fixture" .yaml)"
  check "KeyRotation fixture $base against the CRD schema" "$py" - "$fixture" crds/keyrotations.switchyard.io.yaml <<'PY'
import sys, yaml, jsonschema
cr = yaml.safe_load(open(sys.argv[1]))
schema = yaml.safe_load(open(sys.argv[2]))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
errors = list(jsonschema.Draft7Validator(schema).iter_errors(cr))
for e in errors:
    print(f"  {'/'.join(map(str, e.path))}: {e.message}")
sys.exit(1 if errors else 0)
PY
done

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
