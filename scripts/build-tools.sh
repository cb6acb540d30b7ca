#!/usr/bin/env bash
# Builds the real control-plane components this project tests against, from their
# published Go modules, into a cache outside the repo keyed by version. Idempotent:
# anything already built is reused. Prints the bin directory on its last line.
#
#   kube-apiserver, kube-controller-manager, kubectl  k8s.io/kubernetes via a wrapper module
#   helm                                               go install helm.sh/helm/v3/cmd/helm
#   minio (S3 server enforcing IAM/STS policies)       go install github.com/minio/minio
#   promtool (checks and tests the alerting rules)     go install github.com/prometheus/prometheus/cmd/promtool
#   kueue (a real Kueue controller manager)            go install sigs.k8s.io/kueue/cmd/kueue
#   etcd                                               Debian's etcd-server (3.4.23 supports k8s <= 1.33)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/versions.env"

CACHE="${PRIVATEFM_CACHE:-$HOME/.cache/privatefm}"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS=-mod=mod
BIN="$CACHE/bin"
mkdir -p "$BIN"
log() { echo "[build-tools] $*" >&2; }

# k8s.io/kubernetes is built through a wrapper module whose replace lines pin the staging modules;
# the authoritative staging list is the replace block of the release's own go.mod.
k8s_build() {  # out_dir cmd...
  local out="$1"; shift
  local wrap="$CACHE/src/kubernetes-wrapper-$KUBERNETES_VERSION"
  if [[ ! -f "$wrap/go.mod.done" ]]; then
    rm -rf "$wrap" && mkdir -p "$wrap"
    local minor="${KUBERNETES_VERSION#v1.}"            # 33.13
    cat > "$wrap/go.mod" <<MOD
module privatefm.local/kubernetes-wrapper

go 1.24

require k8s.io/kubernetes $KUBERNETES_VERSION
MOD
    local upstream_mod
    upstream_mod="$(cd "$wrap" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$upstream_mod" | awk -v v="v0.$minor" \
      '{ printf "replace %s => %s %s\n", $1, $1, v }' >> "$wrap/go.mod"
    log "pinned $(grep -c '^replace' "$wrap/go.mod") staging modules to v0.$minor"
    touch "$wrap/go.mod.done"
  fi
  local major_minor="${KUBERNETES_VERSION#v}"; local k_major="${major_minor%%.*}"; local rest="${major_minor#*.}"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=$k_major -X k8s.io/component-base/version.gitMinor=${rest%%.*}"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  log "building kubernetes $KUBERNETES_VERSION: ${*##*/}"
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  (cd "$wrap" && go build -trimpath -ldflags "$ldflags" -o "$out.tmp/" "$@")
  rm -rf "$out" && mv "$out.tmp" "$out"
}

kubernetes() {  # the control plane, then the node's kubelet and kube-scheduler
  local k8s_dir="$CACHE/kubernetes-$KUBERNETES_VERSION" node_dir="$CACHE/kubernetes-node-$KUBERNETES_VERSION"
  if [[ ! -x "$k8s_dir/kube-apiserver" || ! -x "$k8s_dir/kube-controller-manager" || ! -x "$k8s_dir/kubectl" ]]; then
    k8s_build "$k8s_dir" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kubectl
  fi
  for b in kube-apiserver kube-controller-manager kubectl; do ln -sf "$k8s_dir/$b" "$BIN/$b"; done

  # The node (privatefm_testing.node): kubelet and kube-scheduler, in their own cache directory so
  # that adding them did not rebuild the control plane.
  if [[ ! -x "$node_dir/kubelet" || ! -x "$node_dir/kube-scheduler" ]]; then
    k8s_build "$node_dir" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler
  fi
  for b in kubelet kube-scheduler; do ln -sf "$node_dir/$b" "$BIN/$b"; done
}

go_install() {  # name module@version
  local name="$1" target="$2" dir="$CACHE/$1-${2##*@}"
  if [[ ! -x "$dir/$name" ]]; then
    log "go install $target"
    GOBIN="$dir" go install -trimpath -ldflags "-s -w" "$target"
  fi
  ln -sf "$dir/$name" "$BIN/$name"
}

tools() {  # helm, MinIO, the linters, promtool and Kueue
  go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  go_install minio "github.com/minio/minio@$MINIO_VERSION"

  # ---- manifest linters (tests/test_chart_lint.py) ----
  go_install kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  # kube-score checks best practices (.kube-score.yaml); it runs wherever kube-linter cannot be built.
  go_install kube-score "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
  # kube-linter's module (golang.stackrox.io/kube-linter) is refused by the module proxy this project
  # can reach, so it is built only where that works; the suite skips kube-linter, with this reason,
  # where the binary is missing. Set PRIVATEFM_KUBE_LINTER_SRC to a checkout of stackrox/kube-linter
  # at $KUBE_LINTER_VERSION to build it from source instead.
  if [[ ! -x "$CACHE/kube-linter-$KUBE_LINTER_VERSION/kube-linter" ]]; then
    if [[ -n "${PRIVATEFM_KUBE_LINTER_SRC:-}" ]]; then
      log "building kube-linter $KUBE_LINTER_VERSION from $PRIVATEFM_KUBE_LINTER_SRC"
      (cd "$PRIVATEFM_KUBE_LINTER_SRC" && go build -trimpath -ldflags "-s -w" \
        -o "$CACHE/kube-linter-$KUBE_LINTER_VERSION/kube-linter" ./cmd/kube-linter)
    elif ! GOBIN="$CACHE/kube-linter-$KUBE_LINTER_VERSION" go install -trimpath -ldflags "-s -w" \
        "golang.stackrox.io/kube-linter/cmd/kube-linter@$KUBE_LINTER_VERSION" 2>/dev/null; then
      log "kube-linter $KUBE_LINTER_VERSION: not served by the module proxy; its tests will skip"
    fi
  fi
  if [[ -x "$CACHE/kube-linter-$KUBE_LINTER_VERSION/kube-linter" ]]; then
    ln -sf "$CACHE/kube-linter-$KUBE_LINTER_VERSION/kube-linter" "$BIN/kube-linter"
  fi
  # ---- end manifest linters ----

  # promtool: tests/test_monitoring.py checks the chart's PrometheusRule with it. Built without
  # Prometheus's service-discovery plugins (build tag remove_all_sd, Prometheus >= 3.10): rule
  # checks and rule tests need none, and leaving out the cloud SDKs makes a cold build minutes
  # shorter.
  promtool_dir="$CACHE/promtool-$PROMETHEUS_VERSION-nosd"
  if [[ ! -x "$promtool_dir/promtool" ]]; then
    log "go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION (-tags remove_all_sd)"
    GOBIN="$promtool_dir" go install -trimpath -tags remove_all_sd -ldflags "-s -w" \
      "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  fi
  ln -sf "$promtool_dir/promtool" "$BIN/promtool"

  # Kueue's controller manager and its CRDs (tests/test_kueue.py; privatefm_testing/kueue.py runs it).
  kueue_dir="$CACHE/kueue-$KUEUE_VERSION"
  if [[ ! -x "$kueue_dir/kueue" || ! -d "$kueue_dir/crds" ]]; then
    log "go install sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
    rm -rf "$kueue_dir.tmp" && mkdir -p "$kueue_dir.tmp/crds"
    GOBIN="$kueue_dir.tmp" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
    kueue_src="$(GOFLAGS= go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
    cp "$kueue_src"/config/components/crd/bases/*.yaml "$kueue_dir.tmp/crds/"
    rm -rf "$kueue_dir" && mv "$kueue_dir.tmp" "$kueue_dir"
  fi
  ln -sf "$kueue_dir/kueue" "$BIN/kueue"
  ln -sfn "$kueue_dir/crds" "$BIN/kueue-crds"
}

# Two lanes side by side: the compiler keeps both CPUs busy most of the time, but each build also
# waits on the network (its modules) and on single-threaded links, which the other lane fills.
kubernetes &
k8s_lane=$!
trap 'pkill -P "$k8s_lane" 2>/dev/null; kill "$k8s_lane" 2>/dev/null || true' EXIT  # a failed tool stops it
tools
wait "$k8s_lane" || { log "the Kubernetes builds failed"; exit 1; }
trap - EXIT

if ! command -v etcd >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing Debian etcd-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    systemctl disable --now etcd >/dev/null 2>&1 || true
  else
    log "etcd is missing: install Debian's etcd-server"; exit 1
  fi
fi
ln -sf "$(command -v etcd)" "$BIN/etcd"

# The binaries above are the cache (keyed by version). Go's build and module caches (about 7 and
# 5 GB after the Kubernetes builds) would only speed up a rebuild at a new version, and building
# the node's merge image needs that disk more (docs/images.md).
go clean -cache -modcache
echo "$BIN"
