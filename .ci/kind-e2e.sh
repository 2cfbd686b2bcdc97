#!/usr/bin/env bash
# The kube tests against a real cluster: kind + the images built here + the Helm chart.
# Needs docker, kind, helm and kubectl on a Linux host; it cannot run on the development machines (no
# container engine), so it is kept short and reviewed. Usage: .ci/kind-e2e.sh   (after `make setup`)
set -euo pipefail
CLUSTER=${CLUSTER:-tensafe}
TAG=${TAG:-dev}
KUBECONFIG_FILE=${KUBECONFIG_FILE:-/tmp/kind-$CLUSTER.kubeconfig}

kind create cluster --name "$CLUSTER"
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG_FILE"
export KUBECONFIG=$KUBECONFIG_FILE

# A CPU trainer image is enough for the tests' tiny models.
docker build -f trainer-image/Dockerfile -t "ghcr.io/tensafe/tensafe-trainer:$TAG" \
  --build-arg CUDA_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
docker build -f operator/Dockerfile -t "ghcr.io/tensafe/tensafe-operator:$TAG" .
kind load docker-image --name "$CLUSTER" "ghcr.io/tensafe/tensafe-trainer:$TAG" "ghcr.io/tensafe/tensafe-operator:$TAG"

helm install tensafe helm/tensafe --namespace tensafe-system --create-namespace --wait \
  --set operator.image.tag="$TAG" --set operator.image.pullPolicy=Never --set trainer.image.tag="$TAG"

# The SDK reaches trainer pods by pod IP from outside the cluster: route the pod network via the node.
NODE_IP=$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$CLUSTER-control-plane")
POD_CIDR=$(kubectl get node "$CLUSTER-control-plane" -o jsonpath='{.spec.podCIDR}')
sudo ip route replace "$POD_CIDR" via "$NODE_IP"

# Tests that restart the emulator or kill a local pod process skip themselves on a real cluster.
TENSAFE_TEST_KUBECONFIG=$KUBECONFIG_FILE .venv/bin/python -m pytest -q \
  tests/kube/test_kube_operator.py tests/kube/test_kube_kubectl.py tests/kube/test_kube_keys.py
