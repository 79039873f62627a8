#!/usr/bin/env bash
# Release-CI checks of the Helm chart with the real tools: `helm lint` (with the values
# schema) and `helm template | kubeconform` for the default values and for per-namespace
# RBAC. Skips, with a message, where helm or kubeconform is not installed (as in the dev
# container); `cargo test -p dreambooth-tests --test chart` covers what needs no helm.
set -euo pipefail

cd "$(dirname "$0")/.."
chart=charts/dreambooth-operator
# Kubernetes version the manifests are checked against; the chart needs >= 1.29.
kube_version=${KUBE_VERSION:-1.31.0}

if ! command -v helm >/dev/null 2>&1; then
    echo "tests/chart.sh: skipped: helm is not installed (release CI installs helm and kubeconform)"
    exit 0
fi

helm lint --strict "$chart"
helm lint --strict "$chart" --set 'watchNamespaces={ml,art}' --set replicas=1

if ! command -v kubeconform >/dev/null 2>&1; then
    echo "tests/chart.sh: helm lint passed; kubeconform skipped: not installed"
    exit 0
fi

# The Prometheus Operator's API turns the monitors on; their schemas are not in kubeconform's
# default catalogue, so those two kinds are skipped rather than failed.
kubeconform_args=(-strict -summary -kubernetes-version "$kube_version"
    -skip ServiceMonitor,PodMonitor)
for variant in "" "--set watchNamespaces={ml,art}" "--api-versions monitoring.coreos.com/v1"; do
    echo "== helm template $variant"
    # shellcheck disable=SC2086 # the variant is several words on purpose
    helm template dreambooth-operator "$chart" --namespace dreambooth-system \
        --kube-version "$kube_version" $variant |
        kubeconform "${kubeconform_args[@]}" -
done

# The CRD itself against the apiextensions schema.
kubeconform -strict -summary -kubernetes-version "$kube_version" crds/dreamboothsession.yaml
echo "tests/chart.sh: all chart checks passed"
