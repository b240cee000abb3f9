#!/usr/bin/env bash
# Builds Kubernetes components from their Go modules, once per machine, for the tests that run
# against real ones: kube-apiserver and etcd (controller-runtime's envtest reads them from
# KUBEBUILDER_ASSETS) and kube-proxy (test/kubeproxy) by default; the whole node's binaries and the
# upstream e2e suite on request.
#
#   bash hack/kube-assets.sh [NAME...]              build what is missing, say where it is
#   bash hack/kube-assets.sh --print-dir [NAME...]  the same, printing ONLY the directory on
#                                                   stdout (everything else goes to stderr), e.g.
#                                                   KUBEBUILDER_ASSETS=$(bash hack/kube-assets.sh --print-dir)
#
# NAME is one of kube-apiserver etcd kube-proxy (the default set: all three), kubelet
# kube-controller-manager kube-scheduler kubectl e2e.test agnhost, or "node" for every one of them.
# Binaries are cached by version under $SLUICE_KUBE_ASSETS_CACHE, else
# /var/cache/sluice/kube-assets (root) or ${XDG_CACHE_HOME:-~/.cache}/sluice/kube-assets; each
# is built only when missing, and every build prints its time. A cold build of the default set
# took 9 minutes for kube-apiserver and etcd on 2 quiet cores (Go build cache empty), kube-proxy
# adds the figure printed by its build (README). Concurrent callers (several test packages) wait
# on a lock instead of building twice.
set -euo pipefail

KUBE_VERSION=v1.37.2
STAGING_VERSION=v0.37.2 # k8s.io/kubernetes vX.Y.Z pairs with staging modules v0.Y.Z
ETCD_VERSION=v3.7.3

default_set=(kube-apiserver etcd kube-proxy)
node_set=(kube-apiserver etcd kube-proxy kubelet kube-controller-manager kube-scheduler kubectl e2e.test agnhost)

print_dir=0
want=()
for a in "$@"; do
  case "$a" in
    --print-dir) print_dir=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    node) want+=("${node_set[@]}") ;;
    kube-apiserver|etcd|kube-proxy|kubelet|kube-controller-manager|kube-scheduler|kubectl|e2e.test|agnhost) want+=("$a") ;;
    *) echo "hack/kube-assets.sh: unknown argument $a (use --print-dir and names from: node ${node_set[*]})" >&2; exit 2 ;;
  esac
done
[ ${#want[@]} -gt 0 ] || want=("${default_set[@]}")

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

missing() {
  local m=() n
  for n in "${want[@]}"; do [ -x "$dir/$n" ] || m+=("$n"); done
  echo "${m[@]:-}"
}

done_msg() {
  if [ $print_dir = 1 ]; then echo "$dir" >&3; else echo "${want[*]} ($KUBE_VERSION, etcd $ETCD_VERSION) in $dir"; fi
}

[ -n "$(missing)" ] || { done_msg; exit 0; }

command -v go >/dev/null || { echo "hack/kube-assets.sh: go is not on PATH; install Go 1.26 first" >&2; exit 1; }
mkdir -p "$base"
# One builder at a time; the others wait and then find the binaries.
exec 9>"$base/.lock"
if ! flock -w 2400 9; then
  echo "hack/kube-assets.sh: waited 40 min for $base/.lock; remove it if no build is running" >&2
  exit 1
fi
todo=$(missing)
[ -n "$todo" ] || { done_msg; exit 0; }

work=$(mktemp -d "$base/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out" "$dir"
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

# kubemod prepares (once) a module that requires k8s.io/kubernetes. kubernetes requires its
# staging modules at v0.0.0 and replaces them with local directories, which a dependent module
# does not see; so each one is replaced here by its published version. The list comes from
# kubernetes' own go.mod, so it stays right across versions.
kubemod() {
  [ -f "$work/kube/go.mod" ] && return 0
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
  )
}

# build NAME: one binary into $work/out, then checked (it must run) and moved into the cache.
build() {
  local name=$1 t0 pkg
  t0=$(date +%s)
  echo "building $name..."
  case "$name" in
    etcd)
      # etcd's server module is its main package; its own replace directives point at sibling
      # directories and are ignored for a dependency, which then resolves to the same tagged versions.
      mkdir -p "$work/etcd"
      (
        cd "$work/etcd"
        [ -f go.mod ] || go mod init sluice.local/etcd-assets >/dev/null 2>&1
        go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        go build -trimpath -ldflags=-s -o "$work/out/etcd" go.etcd.io/etcd/server/v3
      )
      "$work/out/etcd" --version >/dev/null
      ;;
    e2e.test)
      # The upstream conformance/e2e suite is a test binary of k8s.io/kubernetes/test/e2e.
      kubemod
      (cd "$work/kube" && go test -c -trimpath -ldflags=-s -o "$work/out/e2e.test" k8s.io/kubernetes/test/e2e)
      "$work/out/e2e.test" --help >/dev/null 2>&1 || { echo "hack/kube-assets.sh: the built e2e.test does not run" >&2; exit 1; }
      ;;
    agnhost)
      kubemod
      (cd "$work/kube" && go build -trimpath -ldflags=-s -o "$work/out/agnhost" k8s.io/kubernetes/test/images/agnhost)
      "$work/out/agnhost" --help >/dev/null
      ;;
    *)
      kubemod
      pkg=k8s.io/kubernetes/cmd/$name
      (cd "$work/kube" && go build -trimpath -ldflags=-s -o "$work/out/$name" "$pkg")
      if [ "$name" = kubectl ]; then "$work/out/$name" version --client >/dev/null; else "$work/out/$name" --version >/dev/null; fi
      ;;
  esac
  mv "$work/out/$name" "$dir/$name"
  local secs=$(( $(date +%s) - t0 ))
  echo "built $name in $secs s"
  # Kept beside the binaries, so a report made later from the cache can say what it cost.
  echo "$name $secs s on $(date -u +%Y-%m-%d), $(nproc) vCPU, load average $(cut -d' ' -f1 /proc/loadavg) at the end" >>"$dir/build-times.txt"
}

start=$(date +%s)
for n in $todo; do build "$n"; done
echo "built $todo in $(( $(date +%s) - start )) s"
done_msg
