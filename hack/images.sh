#!/usr/bin/env bash
# Builds the container images the local cluster needs, without a registry, as OCI archives that
# `ctr -n k8s.io images import` reads:
#
#   pause   registry.k8s.io/pause:3.10.2 (containerd's sandbox_image): Kubernetes' own pause.c
#           from the k8s.io/kubernetes module, linked statically
#   agnhost registry.k8s.io/e2e-test-images/agnhost:2.66.1 (the tag the e2e suite of
#           k8s.io/kubernetes v1.37.2 asks for): /agnhost built by hack/kube-assets.sh
#   sluice  localhost/sluice:VERSION: a Debian rootfs (mmdebstrap) with the packages, binary path
#           and entrypoint of hack/image.env, the same layout the Dockerfile builds
#
#   bash hack/images.sh OUTDIR SLUICE_BINARY VERSION
#
# Prints one line per image, "ARCHIVE NAME". pause and agnhost are cached under
# /var/cache/sluice/images by version; the Debian rootfs is cached by its package list.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=image.env
. "$here/image.env"

out=${1:?usage: hack/images.sh OUTDIR SLUICE_BINARY VERSION}
sluice_bin=${2:?usage: hack/images.sh OUTDIR SLUICE_BINARY VERSION}
version=${3:?usage: hack/images.sh OUTDIR SLUICE_BINARY VERSION}
KUBE_VERSION=v1.37.2
PAUSE=registry.k8s.io/pause:3.10.2
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.66.1
cache=${SLUICE_IMAGES_CACHE:-/var/cache/sluice/images}
mkdir -p "$out" "$cache"
exec 3>&1 1>&2

for t in umoci mmdebstrap gcc; do command -v "$t" >/dev/null || { echo "hack/images.sh: $t is missing (hack/node-deps.sh node installs it)" >&2; exit 1; }; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# oci NAME:TAG ROOTFS_DIR ARCHIVE ENTRYPOINT [CMD]: an OCI image archive whose only layer is the
# directory, named so that ctr import --base-name gives NAME:TAG.
oci() {
  local ref=$1 rootfs=$2 archive=$3 entry=$4 cmd=${5:-} tag=${1##*:} l=$work/layout b=$work/bundle
  rm -rf "$l" "$b"
  umoci init --layout "$l"
  umoci new --image "$l:$tag"
  umoci unpack --image "$l:$tag" "$b" >/dev/null
  cp -a "$rootfs/." "$b/rootfs/"
  umoci repack --image "$l:$tag" "$b" >/dev/null
  local args=(--image "$l:$tag" --os linux --architecture amd64 --config.entrypoint "$entry" --no-history)
  [ -z "$cmd" ] || args+=(--config.cmd "$cmd")
  umoci config "${args[@]}"
  umoci gc --layout "$l"
  tar -C "$l" -cf "$archive.tmp" .
  mv "$archive.tmp" "$archive"
}

t0=$(date +%s)
# --- pause --------------------------------------------------------------------------------
p=$cache/pause-3.10.2.tar
if [ ! -f "$p" ]; then
  src=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  mkdir -p "$work/pause"
  gcc -Os -Wall -static -DVERSION=v3.10.2 -o "$work/pause/pause" "$src/build/pause/linux/pause.c"
  strip "$work/pause/pause"
  oci "$PAUSE" "$work/pause" "$p" /pause
fi
cp "$p" "$out/pause.tar"
echo "$out/pause.tar $PAUSE" >&3

# --- agnhost ------------------------------------------------------------------------------
a=$cache/agnhost-2.66.1-$KUBE_VERSION.tar
if [ ! -f "$a" ]; then
  assets=$(bash "$here/kube-assets.sh" --print-dir agnhost)
  mkdir -p "$work/agnhost"
  cp "$assets/agnhost" "$work/agnhost/agnhost"
  oci "$AGNHOST" "$work/agnhost" "$a" /agnhost pause
fi
cp "$a" "$out/agnhost.tar"
echo "$out/agnhost.tar $AGNHOST" >&3

# --- sluice -------------------------------------------------------------------------------
key=$(echo "$SLUICE_IMAGE_SUITE $SLUICE_IMAGE_PACKAGES" | sha256sum | cut -c1-12)
rootfs=$cache/sluice-rootfs-$key.tar
if [ ! -f "$rootfs" ]; then
  echo "building the sluice rootfs ($SLUICE_IMAGE_SUITE: $SLUICE_IMAGE_PACKAGES) with mmdebstrap..."
  # The host's apt sources (no mirror given): the Debian archive this machine already uses.
  mmdebstrap --quiet --variant=minbase --include="${SLUICE_IMAGE_PACKAGES// /,}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    --format=tar "$SLUICE_IMAGE_SUITE" "$work/rootfs.tar"
  mv "$work/rootfs.tar" "$rootfs"
fi
mkdir -p "$work/sluice"
tar -C "$work/sluice" -xf "$rootfs"
install -D -m 0755 "$sluice_bin" "$work/sluice$SLUICE_IMAGE_BINARY"
ref=localhost/sluice:$version
oci "$ref" "$work/sluice" "$out/sluice.tar" "$SLUICE_IMAGE_BINARY" "$SLUICE_IMAGE_CMD"
echo "$out/sluice.tar $ref" >&3
echo "images in $(( $(date +%s) - t0 )) s"
