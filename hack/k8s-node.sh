#!/usr/bin/env bash
# A whole Kubernetes node inside one network namespace of this machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd + runc (Debian) with a ptp CNI network,
# kubelet and kube-proxy, all built here (hack/kube-assets.sh node) or from the Debian archive
# (hack/node-deps.sh node). Sourced by hack/e2e-k8s.sh; not meant to be run on its own.
#
# Nothing routes out of the namespace: its default route is a device that discards what
# it is given (see node_up). What cannot be kept inside the namespace, and is undone by node_teardown (also on
# failure and Ctrl-C, through the cleanup stack, and by node_sweep for a killed run):
#   - mounts (containerd's overlays and shm, the kubelet's volumes) under $K8S_ROOT and $K8S_RUN
#   - /run/containerd (containerd's shim sockets), /var/lib/kubelet, /var/log/containers and
#     /run/sluice (the DaemonSet's hostPath), when this run made them
#   - cgroups under /sys/fs/cgroup/*/sluice-k8s (the kubelet's cgroupRoot)
#   - kernel settings the kubelet writes machine-wide (kernel.panic_on_oops, kernel.panic,
#     vm.overcommit_memory, vm.panic_on_oom, kernel.keys.*): saved before, restored after it starts
#     and on exit
set -euo pipefail

K8S_VERSION=v1.37.2 # hack/kube-assets.sh builds this one
K8S_NS=sluice-k8s
K8S_ROOT=/var/lib/sluice-k8s
K8S_RUN=/run/sluice-k8s
K8S_NODE=sluice-node
K8S_NODE_IP=10.250.0.1
K8S_POD_CIDR=10.244.0.0/24
K8S_CLUSTER_CIDR=10.244.0.0/16
K8S_SERVICE_CIDR=10.96.0.0/16
K8S_API_SVC_IP=10.96.0.1
K8S_CGROUP=sluice-k8s
K8S_SYSCTLS=(kernel.panic_on_oops kernel.panic vm.overcommit_memory vm.panic_on_oom kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
PAUSE_IMAGE=registry.k8s.io/pause:3.10.2

log() { printf '%s [k8s-node] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- cleanup stack ---------------------------------------------------------------------------
_cleanup=()
defer() { _cleanup+=("$*"); }
run_cleanup() {
  local i
  for ((i=${#_cleanup[@]}-1; i>=0; i--)); do eval "${_cleanup[i]}" || true; done
  _cleanup=()
}

innode() { nsenter --net="/run/netns/$K8S_NS" -- "$@"; }

# start NAME CMD...: a component in the node namespace, its pid in $K8S_RUN/NAME.pid and its
# log in $K8S_ROOT/logs/NAME.log; stopped (TERM, then KILL) by node_down.
start() {
  local name=$1; shift
  setsid nsenter --net="/run/netns/$K8S_NS" -- "$@" >>"$K8S_ROOT/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$K8S_RUN/$name.pid"
  disown $! # its end is ours to report, not the shell's
  log "started $name (pid $!)"
}

stop() {
  local name=$1 pid i
  [ -f "$K8S_RUN/$name.pid" ] || return 0
  pid=$(cat "$K8S_RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$K8S_RUN/$name.pid"
}

alive() { [ -f "$K8S_RUN/$1.pid" ] && kill -0 "$(cat "$K8S_RUN/$1.pid")" 2>/dev/null; }

# wait_for WHAT SECONDS COMPONENT CMD...: poll CMD once a second; on time-out or when the
# component died, show its log and fail.
wait_for() {
  local what=$1 secs=$2 comp=$3 i; shift 3
  for ((i=0; i<secs; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -n "$comp" ] && ! alive "$comp"; then
      tail -n 40 "$K8S_ROOT/logs/$comp.log" >&2 || true
      die "$comp exited while waiting for $what"
    fi
    sleep 1
  done
  [ -z "$comp" ] || tail -n 40 "$K8S_ROOT/logs/$comp.log" >&2 || true
  die "$what: not within $secs s"
}

# --- ownership marker and sweeper ------------------------------------------------------------
procstart() { awk '{sub(/^.*\) /, ""); print $20}' "/proc/$1/stat" 2>/dev/null; }

owner_alive() {
  local pid st
  [ -f "$K8S_RUN/owner" ] || return 1
  read -r pid st <"$K8S_RUN/owner" || return 1
  [ "$(procstart "$pid")" = "$st" ]
}

# node_sweep removes what a killed run left (its owner process is gone); a live run is refused.
node_sweep() {
  if owner_alive; then die "another run owns $K8S_RUN (pid $(cut -d' ' -f1 "$K8S_RUN/owner")); stop it first"; fi
  if [ -e "$K8S_RUN" ] || [ -e "$K8S_ROOT" ] || ip netns list | grep -qw "^$K8S_NS"; then
    log "sweeping leftovers of an earlier run"
    node_teardown
  fi
}

node_teardown() {
  local c pid m d
  for c in kube-proxy kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
  # Whatever still runs in the namespace (containers' shims and processes).
  if ip netns list | grep -qw "^$K8S_NS"; then
    for pid in $(ip netns pids "$K8S_NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  # Processes of containers live in our cgroups even when they left the namespace.
  for d in /sys/fs/cgroup/*/"$K8S_CGROUP"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  sleep 0.5
  # Mounts, deepest first.
  for m in $(awk -v a="$K8S_ROOT" -v b="$K8S_RUN" '$5 ~ "^"a || $5 ~ "^"b || $5 ~ "^/run/containerd/io.containerd" {print $5}' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for d in /sys/fs/cgroup/*/"$K8S_CGROUP"; do
    [ -d "$d" ] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  restore_sysctls
  if [ -f "$K8S_RUN/made" ]; then
    while IFS= read -r d; do
      case "$d" in /run/containerd|/var/lib/kubelet|/var/log/containers|/run/sluice) rm -rf "$d" ;; esac
    done <"$K8S_RUN/made"
  fi
  ip netns del "$K8S_NS" 2>/dev/null || true
  # containerd's CRI binds each pod sandbox's namespace at /run/netns/cni-*, whatever its state
  # dir; ours are those made since this run started, now without a process (their veth peers
  # went with the node namespace).
  if [ -f "$K8S_RUN/owner" ]; then
    for m in $(find /run/netns -maxdepth 1 -name 'cni-*' -newer "$K8S_RUN/owner" 2>/dev/null); do
      [ -z "$(ip netns pids "${m##*/}" 2>/dev/null)" ] && ip netns del "${m##*/}" 2>/dev/null || true
    done
  fi
  rm -rf "$K8S_ROOT" "$K8S_RUN"
}

save_sysctls() {
  local k f=$K8S_RUN/../sluice-k8s.sysctls
  [ -f "$f" ] && return 0 # an earlier, killed run's saved values are the machine's real ones
  for k in "${K8S_SYSCTLS[@]}"; do echo "$k=$(sysctl -n "$k")"; done >"$f.tmp"
  mv "$f.tmp" "$f"
}

restore_sysctls() {
  local f=$K8S_RUN/../sluice-k8s.sysctls line
  [ -f "$f" ] || return 0
  while IFS= read -r line; do
    [ "$(sysctl -n "${line%%=*}")" = "${line#*=}" ] || sysctl -q -w "$line" >/dev/null || true
  done <"$f"
  [ "${1:-}" = keep ] || rm -f "$f"
}

# --- certificates and kubeconfigs ------------------------------------------------------------
pki() {
  local p=$K8S_ROOT/pki
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -out "$p/ca.crt" -days 2 -subj "/CN=sluice-e2e-ca" 2>/dev/null
  # name CN O SANs usage
  cert() {
    local name=$1 cn=$2 o=$3 sans=$4 usage=$5 subj="/CN=$2"
    [ -z "$o" ] || subj="/O=$o/CN=$cn"
    openssl req -newkey rsa:2048 -nodes -keyout "$p/$name.key" -out "$p/$name.csr" -subj "$subj" 2>/dev/null
    {
      echo "basicConstraints=CA:FALSE"
      echo "keyUsage=digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=$usage"
      [ -z "$sans" ] || echo "subjectAltName=$sans"
    } >"$p/$name.ext"
    openssl x509 -req -in "$p/$name.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 2 -extfile "$p/$name.ext" -out "$p/$name.crt" 2>/dev/null
  }
  cert apiserver kube-apiserver "" "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:$K8S_API_SVC_IP,IP:$K8S_NODE_IP,IP:127.0.0.1" serverAuth
  cert admin kubernetes-admin system:masters "" clientAuth
  cert apiserver-kubelet kube-apiserver-kubelet-client system:masters "" clientAuth
  cert kcm system:kube-controller-manager "" "" clientAuth
  cert scheduler system:kube-scheduler "" "" clientAuth
  cert kubelet "system:node:$K8S_NODE" system:nodes "" clientAuth
  cert kube-proxy system:kube-proxy "" "" clientAuth
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  local who
  for who in admin kcm scheduler kubelet kube-proxy; do kubeconfig "$who"; done
}

kubeconfig() {
  local who=$1 p=$K8S_ROOT/pki
  cat >"$K8S_ROOT/$who.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://$K8S_NODE_IP:6443
    certificate-authority-data: $(base64 -w0 "$p/ca.crt")
users:
- name: $who
  user:
    client-certificate-data: $(base64 -w0 "$p/$who.crt")
    client-key-data: $(base64 -w0 "$p/$who.key")
contexts:
- name: e2e
  context: {cluster: e2e, user: $who}
current-context: e2e
EOF
}

kc() { innode "$ASSETS/kubectl" --kubeconfig "$K8S_ROOT/admin.kubeconfig" "$@"; }

# --- the node --------------------------------------------------------------------------------
# node_up ASSETS IMAGE...: ASSETS holds the binaries; each IMAGE is "ARCHIVE NAME:TAG", an OCI
# archive (hack/images.sh) imported into containerd's k8s.io namespace under that name.
node_up() {
  ASSETS=$1; shift
  local t0 images=("$@") img
  t0=$(date +%s)
  node_sweep
  mkdir -p "$K8S_RUN" "$K8S_ROOT/logs"
  echo "$$ $(procstart $$)" >"$K8S_RUN/owner"
  defer node_teardown
  save_sysctls

  ip netns add "$K8S_NS"
  innode ip link set lo up
  # The node's address on its "uplink", and a default route through it, as on a real node. This
  # kernel has no dummy device: the uplink is a veth whose peer stays down and which never
  # resolves neighbours, so what is routed there is discarded in silence and nothing leaves.
  innode ip link add node0 type veth peer name node0-void
  innode ip addr add "$K8S_NODE_IP/32" dev node0
  innode ip link set node0 arp off up
  innode ip route add default dev node0
  innode sysctl -q -w net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

  pki
  start etcd "$ASSETS/etcd" --name e2e --data-dir "$K8S_ROOT/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --unsafe-no-fsync
  local p=$K8S_ROOT/pki
  start kube-apiserver "$ASSETS/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$K8S_NODE_IP" --bind-address=0.0.0.0 --secure-port=6443 \
    --service-cluster-ip-range="$K8S_SERVICE_CIDR" --allow-privileged=true \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$p/apiserver-kubelet.crt" --kubelet-client-key="$p/apiserver-kubelet.key" \
    --kubelet-preferred-address-types=InternalIP --profiling=false
  wait_for "kube-apiserver /readyz" 120 kube-apiserver kc get --raw /readyz
  start kube-controller-manager "$ASSETS/kube-controller-manager" --kubeconfig="$K8S_ROOT/kcm.kubeconfig" \
    --authentication-kubeconfig="$K8S_ROOT/kcm.kubeconfig" --authorization-kubeconfig="$K8S_ROOT/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
    --cluster-cidr="$K8S_CLUSTER_CIDR" --service-cluster-ip-range="$K8S_SERVICE_CIDR" --profiling=false
  start kube-scheduler "$ASSETS/kube-scheduler" --kubeconfig="$K8S_ROOT/scheduler.kubeconfig" \
    --authentication-kubeconfig="$K8S_ROOT/scheduler.kubeconfig" --authorization-kubeconfig="$K8S_ROOT/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false

  # containerd 1.6 and runc from Debian, every path of its own under $K8S_ROOT / $K8S_RUN.
  mkdir -p "$K8S_ROOT/cni/net.d" "$K8S_RUN/containerd"
  cat >"$K8S_ROOT/cni/net.d/10-ptp.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "sluice-e2e", "plugins": [
  {"type": "ptp", "ipMasq": false, "mtu": 1500,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$K8S_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$K8S_ROOT/cni/ipam"}}]}
EOF
  cat >"$K8S_ROOT/containerd.toml" <<EOF
version = 2
root = "$K8S_ROOT/containerd"
state = "$K8S_RUN/containerd"
[grpc]
  address = "$K8S_RUN/containerd/containerd.sock"
[ttrpc]
  address = "$K8S_RUN/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$K8S_ROOT/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$K8S_RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$K8S_ROOT/cni/net.d"
EOF
  # Paths containerd (its shims' sockets, /run/containerd/s) and the kubelet (device plugin and
  # pod-resources sockets, the container log links) use whatever their configuration says:
  # removed on exit when this run made them.
  local d
  # /run/sluice is the DaemonSet's hostPath for the agent's rules lock.
  for d in /run/containerd /var/lib/kubelet /var/log/containers /run/sluice; do [ -e "$d" ] || echo "$d" >>"$K8S_RUN/made"; done
  start containerd containerd --config "$K8S_ROOT/containerd.toml"
  local ctr=(ctr --address "$K8S_RUN/containerd/containerd.sock" -n k8s.io)
  wait_for "containerd socket" 60 containerd "${ctr[@]}" version
  for img in "${images[@]}"; do
    local archive=${img%% *} ref=${img#* }
    "${ctr[@]}" images import --base-name "${ref%:*}" "$archive" >/dev/null || die "ctr images import $archive"
    # Not grep -q: it exits at the first match, ctr (Go, a write per line) then dies of SIGPIPE
    # on the next line, and pipefail fails the check although the image is there.
    "${ctr[@]}" images ls -q | grep -x "$ref" >/dev/null || die "$archive was imported, but not as $ref"
  done
  log "images: $("${ctr[@]}" images ls -q | grep -v '^sha256:' | tr '\n' ' ')"

  cat >"$K8S_ROOT/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$K8S_CGROUP
containerRuntimeEndpoint: unix://$K8S_RUN/containerd/containerd.sock
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: AlwaysAllow}
rotateCertificates: false
serverTLSBootstrap: false
address: $K8S_NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
failSwapOn: false
protectKernelDefaults: false
resolvConf: $K8S_ROOT/resolv.conf
podLogsDir: $K8S_ROOT/pod-logs
volumePluginDir: $K8S_ROOT/kubelet-plugins
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 110
EOF
  : >"$K8S_ROOT/resolv.conf"
  # Paths the kubelet uses whatever its --root-dir (device plugin and pod-resources sockets,
  # the container log links): removed on exit if this run made them.
  local d
  # The kubelet's cgroupRoot must exist in every v1 hierarchy (cpuset needs its cpus and mems).
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -f "$h/cgroup.procs" ] || continue
    mkdir -p "$h$K8S_CGROUP"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" >"$h$K8S_CGROUP/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h$K8S_CGROUP/cpuset.mems"
    fi
  done
  start kubelet "$ASSETS/kubelet" --config="$K8S_ROOT/kubelet.yaml" --kubeconfig="$K8S_ROOT/kubelet.kubeconfig" \
    --root-dir="$K8S_ROOT/kubelet" --cert-dir="$K8S_ROOT/kubelet/pki" --hostname-override="$K8S_NODE" \
    --node-ip="$K8S_NODE_IP" --v=2
  # The kubelet writes kernel.panic_on_oops=1 (and friends) for the whole machine at start.
  wait_for "kubelet /healthz" 120 kubelet innode curl -sf http://127.0.0.1:10248/healthz
  restore_sysctls keep

  cat >"$K8S_ROOT/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $K8S_ROOT/kube-proxy.kubeconfig}
hostnameOverride: $K8S_NODE
clusterCIDR: $K8S_CLUSTER_CIDR
detectLocalMode: ClusterCIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0}
EOF
  # Its user, system:kube-proxy, is bound to system:node-proxier by the API server's bootstrap RBAC.
  start kube-proxy "$ASSETS/kube-proxy" --config="$K8S_ROOT/kube-proxy.yaml" --v=2
  wait_for "node $K8S_NODE Ready" 180 kubelet kc wait --for=condition=Ready "node/$K8S_NODE" --timeout=1s
  wait_for "kube-proxy /healthz" 60 kube-proxy innode curl -sf http://127.0.0.1:10256/healthz
  wait_for "the default ServiceAccount" 60 kube-controller-manager kc -n default get serviceaccount default
  restore_sysctls keep
  log "node $K8S_NODE up in $(( $(date +%s) - t0 )) s (kubeconfig $K8S_ROOT/admin.kubeconfig, inside netns $K8S_NS)"
}
