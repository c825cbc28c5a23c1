#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster: build the image, load it, install the chart, run the
# e2e suite (e2e/cluster.rs), delete the cluster. Needs Docker, kind, kubectl and helm.
#   e2e/kind.sh            # KEEP=1 keeps the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e/kind.sh needs $tool" >&2; exit 1; }
done
cluster="${CLUSTER:-tidegate-e2e}"
image="tidegate:e2e"
http_port="${HTTP_PORT:-18080}"

docker build -t "$image" .
cat <<KIND | kind create cluster --name "$cluster" --config -
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraPortMappings:
      - {containerPort: 30080, hostPort: $http_port, listenAddress: 127.0.0.1}
KIND
[ "${KEEP:-0}" = 1 ] || trap 'kind delete cluster --name "$cluster"' EXIT
kind load docker-image "$image" --name "$cluster"
export KUBECONFIG="$(mktemp)"
kind get kubeconfig --name "$cluster" > "$KUBECONFIG"

helm install tidegate charts/tidegate --namespace tidegate --create-namespace --wait --timeout 5m \
  --set image.repository=tidegate --set image.tag=e2e --set image.pullPolicy=Never \
  --set proxy.service.type=NodePort --set proxy.service.nodePorts.http=30080 \
  --set proxy.service.externalTrafficPolicy=Cluster
kubectl -n tidegate get pods

TIDEGATE_E2E_IMAGE="$image" TIDEGATE_E2E_HTTP="127.0.0.1:$http_port" cargo test --test e2e -- --nocapture
