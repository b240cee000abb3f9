#!/usr/bin/env bash
# Builds kube-apiserver and etcd from their Go modules, once per machine, for the tests that run
# against a real API server (controller-runtime's envtest reads them from KUBEBUILDER_ASSETS).
#
#   bash hack/kube-assets.sh              build if missing, say where the binaries are
#   bash hack/kube-assets.sh --print-dir  build if missing, print ONLY the directory on stdout
#                                         (everything else goes to stderr), e.g.
#                                         KUBEBUILDER_ASSETS=$(bash hack/kube-assets.sh --print-dir)
#
# Binaries are cached by version under $SLUICE_KUBE_ASSETS_CACHE, else
# /var/cache/sluice/kube-assets (root) or ${XDG_CACHE_HOME:-~/.cache}/sluice/kube-assets.
# A cold build took 9 minutes on 2 quiet cores (Go build cache empty); later runs return at once. Concurrent callers
# (several test packages) wait on a lock instead of building twice.
set -euo pipefail

KUBE_VERSION=v1.37.2
STAGING_VERSION=v0.37.2 # k8s.io/kubernetes vX.Y.Z pairs with staging modules v0.Y.Z
ETCD_VERSION=v3.7.3

print_dir=0
case "${1:-}" in
  --print-dir) print_dir=1 ;;
  "") ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "hack/kube-assets.sh: unknown argument $1 (use --print-dir or nothing)" >&2; exit 2 ;;
esac

# Everything but the final directory goes to stderr, so $(... --print-dir) stays clean.
exec 3>&1 1>&2

if [ -n "${SLUICE_KUBE_ASSETS_CACHE:-}" ]; then
  base=$SLUICE_KUBE_ASSETS_CACHE
elif [ "$(id -u)" = 0 ]; then
  base=/var/cache/sluice/kube-assets
else
  base=${XDG_CACHE_HOME:-$HOME/.cache}/sluice/kube-assets
fi
dir=$base/$KUBE_VERSION-etcd-$ETCD_VERSION

have() { [ -x "$dir/kube-apiserver" ] && [ -x "$dir/etcd" ]; }

done_msg() {
  if [ $print_dir = 1 ]; then echo "$dir" >&3; else echo "kube-apiserver $KUBE_VERSION and etcd $ETCD_VERSION in $dir"; fi
}

if have; then done_msg; exit 0; fi

command -v go >/dev/null || { echo "hack/kube-assets.sh: go is not on PATH; install Go 1.26 first" >&2; exit 1; }
mkdir -p "$base"
# One builder at a time; the others wait and then find the binaries.
exec 9>"$base/.lock"
if ! flock -w 1800 9; then
  echo "hack/kube-assets.sh: waited 30 min for $base/.lock; remove it if no build is running" >&2
  exit 1
fi
if have; then done_msg; exit 0; fi

work=$(mktemp -d "$base/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

start=$(date +%s)

# --- kube-apiserver -----------------------------------------------------------------------
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local
# directories, which a dependent module does not see; so each one is replaced here by its
# published version. The list comes from kubernetes' own go.mod, so it stays right across versions.
mkdir -p "$work/kube"
(
  cd "$work/kube"
  go mod init sluice.local/kube-assets >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$gomod" ] || { echo "hack/kube-assets.sh: could not download k8s.io/kubernetes@$KUBE_VERSION (network or GOPROXY?)" >&2; exit 1; }
  mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")
  [ -n "$mods" ] || { echo "hack/kube-assets.sh: no staging replaces found in $gomod" >&2; exit 1; }
  args=(-require="k8s.io/kubernetes@$KUBE_VERSION")
  for m in $mods; do args+=(-replace="$m=$m@$STAGING_VERSION"); done
  go mod edit "${args[@]}"
  echo "building kube-apiserver $KUBE_VERSION (about 9 minutes on 2 cores with a cold cache)..."
  go build -trimpath -ldflags=-s -o "$work/out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
)

# --- etcd ---------------------------------------------------------------------------------
# etcd's server module is its main package; its own replace directives point at sibling
# directories and are ignored for a dependency, which then resolves to the same tagged versions.
mkdir -p "$work/etcd"
(
  cd "$work/etcd"
  go mod init sluice.local/etcd-assets >/dev/null 2>&1
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  echo "building etcd $ETCD_VERSION..."
  go build -trimpath -ldflags=-s -o "$work/out/etcd" go.etcd.io/etcd/server/v3
)

"$work/out/kube-apiserver" --version >/dev/null
"$work/out/etcd" --version >/dev/null
mkdir -p "$dir"
mv "$work/out/kube-apiserver" "$work/out/etcd" "$dir/"
echo "built in $(( $(date +%s) - start )) s"
done_msg
