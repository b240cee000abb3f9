#!/usr/bin/env bash
# Installs the kernel-rule tools the dataplane, the network-namespace lab and their tests need,
# when missing: iptables (both the nft and the legacy flavour: the rules detect which one a node
# uses, and the tests exercise both), ipset, conntrack and iproute2 (ip netns); and the headers
# and libraries of libnetfilter_queue and libmnl, which the benchmark's C baseline loop
# (bench/cnfqueue) is built against.
set -euo pipefail
need=()
for cmd in iptables iptables-nft iptables-legacy ip6tables-nft-restore ip6tables-legacy-restore; do
  command -v "$cmd" >/dev/null 2>&1 || { need+=(iptables); break; }
done
command -v ipset >/dev/null 2>&1 || need+=(ipset)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -f /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || need+=(libnetfilter-queue-dev)
[ -f /usr/include/libmnl/libmnl.h ] || need+=(libmnl-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "hack/deps.sh: need root to install ${need[*]}" >&2; exit 1; fi
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
