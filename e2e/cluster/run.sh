#!/usr/bin/env bash
# The cluster suite in one command, against a kind or k3d cluster you already have:
#
#   KUBECONFIG=~/.kube/config \
#   OPERATOR_IMAGE=switchyard-operator:dev SWITCHYARD_IMAGE=switchyard-switch:dev \
#   e2e/cluster/run.sh [pytest args]
#
# It builds nothing: build the images with e2e/cluster/Dockerfile and load them first, e.g.
#   docker build -f e2e/cluster/Dockerfile --target operator -t switchyard-operator:dev .
#   docker build -f e2e/cluster/Dockerfile --target switch   -t switchyard-switch:dev .
#   kind load docker-image switchyard-operator:dev switchyard-switch:dev
#   (k3d: k3d image import switchyard-operator:dev switchyard-switch:dev -c <cluster>)
# Use a tag other than `latest` so the nodes do not try to pull loaded images.
#
# It installs the CRDs and the operator from charts/kustomize/base (server-side apply, image
# replaced), runs the embedded example in a throwaway namespace and deletes that namespace.
# The operator stays installed; E2E_UNINSTALL=1 removes it (E2E_DELETE_CRDS=1 also the CRDs,
# which deletes every BankSwitch in the cluster). E2E_TIMEOUT (seconds, default 300) bounds
# each wait; E2E_KEEP_NAMESPACE=1 keeps the namespace for a look after a failure.
#
# Without KUBECONFIG the cluster tests are skipped with that reason (the offline ones run).
# PYTHON must have the packages of e2e/requirements.txt (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ -z "${KUBECONFIG:-}" ]]; then
  echo "e2e/cluster: KUBECONFIG is not set: cluster tests will be SKIPPED (no cluster to run against)."
elif [[ -z "${OPERATOR_IMAGE:-}" || -z "${SWITCHYARD_IMAGE:-}" ]]; then
  echo "e2e/cluster: set OPERATOR_IMAGE and SWITCHYARD_IMAGE: cluster tests will be SKIPPED." >&2
else
  echo "e2e/cluster: cluster $(kubectl config current-context), operator $OPERATOR_IMAGE, switch $SWITCHYARD_IMAGE"
fi
exec "$PYTHON" -m pytest -v -rs "$here" "$@"
