#!/usr/bin/env bash
# Installs from the Debian archive, when missing, what the node tests need beyond hack/deps.sh:
#
#   bash hack/node-deps.sh          nft (kube-proxy's nftables mode; test/kubeproxy) and nsenter
#   bash hack/node-deps.sh node     also a whole node: containerd and runc, the CNI plugins
#                                   (ptp, host-local), umoci and mmdebstrap for the images
set -euo pipefail
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
case "${1:-}" in
  "") ;;
  node)
    command -v containerd >/dev/null 2>&1 || need+=(containerd)
    command -v runc >/dev/null 2>&1 || need+=(runc)
    [ -x /usr/lib/cni/ptp ] && [ -x /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
    command -v umoci >/dev/null 2>&1 || need+=(umoci)
    command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
    ;;
  *) echo "hack/node-deps.sh: unknown argument $1 (use nothing or \"node\")" >&2; exit 2 ;;
esac
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "hack/node-deps.sh: need root to install ${need[*]}" >&2; exit 1; fi
  echo "installing ${need[*]}"
  apt-get update -qq
  # containerd's package would start its own daemon in the machine's namespace; the node
  # starts its own instance with its own state directories instead.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ -d /run/systemd/system ] && systemctl is-active -q containerd 2>/dev/null; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
  fi
fi
