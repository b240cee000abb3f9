#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine (hack/k8s-node.sh: everything inside one
# network namespace), sluice installed from deploy/ as users install it, and either a smoke test
# or the upstream e2e NetworkPolicy suite.
#
#   bash hack/e2e-k8s.sh smoke            node up, a policy that the intruder pod gets through
#                                         without an enforcer, then sluice's DaemonSet ready, one
#                                         allowed and one dropped connection between real pods,
#                                         the drop in `kubectl logs`; last line "N passed, M failed"
#   bash hack/e2e-k8s.sh suite [RESULTS]  node up, the suite (e2e.test --provider=local
#                                         --ginkgo.focus=Netpol --ginkgo.skip=SCTP) without sluice
#                                         (the control: enforcement specs must fail), then with
#                                         sluice; writes RESULTS (markdown) when given; last line
#                                         the run with sluice's "N passed, M failed"
#   bash hack/e2e-k8s.sh sweep            remove what a killed run left behind
#
# Environment: E2E_FOCUS / E2E_SKIP override the suite's focus and skip regexps (to run a few
# specs while debugging). Everything started is stopped and every namespace, mount, cgroup and
# kernel setting restored on exit, on failure and on Ctrl-C.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=k8s-node.sh
. "$repo/hack/k8s-node.sh"

cmd=${1:-}
case "$cmd" in
  smoke|suite) ;;
  sweep) node_sweep; exit 0 ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: the node needs network namespaces, mounts and cgroups"

trap run_cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

declare -A took
phase() { took[$1]=$(( $(date +%s) - $2 )); log "phase $1: ${took[$1]} s"; }

t=$(date +%s)
bash "$repo/hack/deps.sh"
bash "$repo/hack/node-deps.sh" node
phase deps "$t"

t=$(date +%s)
want=(kube-apiserver etcd kube-proxy kubelet kube-controller-manager kube-scheduler kubectl agnhost)
[ "$cmd" = suite ] && want+=(e2e.test)
assets=$(bash "$repo/hack/kube-assets.sh" --print-dir "${want[@]}")
phase kube-assets "$t"

t=$(date +%s)
work=$(mktemp -d /tmp/sluice-e2e-k8s.XXXXXX)
defer "rm -rf '$work'"
version=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo dev)
version=${version//[^A-Za-z0-9_.-]/-}
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$work/sluice" ./cmd/sluice)
mapfile -t images < <(bash "$repo/hack/images.sh" "$work/images" "$work/sluice" "$version")
sluice_image=${images[2]#* }
phase images "$t"

t=$(date +%s)
node_up "$assets" "${images[@]}"
phase cluster-start "$t"

# install_sluice: deploy/ as it is, but for the image name (a kustomize overlay, through
# kubectl's built-in kustomize), then wait for the DaemonSet to be ready.
install_sluice() {
  local o=$K8S_ROOT/overlay t0
  t0=$(date +%s)
  mkdir -p "$o"
  cat >"$o/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $(realpath --relative-to="$o" "$repo/deploy")
images:
- name: sluice
  newName: ${sluice_image%:*}
  newTag: ${sluice_image##*:}
EOF
  kc apply -k "$o" >&2
  kc -n kube-system rollout status ds/sluice --timeout=180s >&2 || {
    kc -n kube-system get pods -o wide >&2; kc -n kube-system describe pods -l app=sluice >&2 | tail -40
    die "sluice's DaemonSet is not ready"
  }
  log "sluice installed from deploy/ ($sluice_image), DaemonSet ready in $(( $(date +%s) - t0 )) s"
}

smoke() {
  local pass=0 fail=0 ip
  check() { # DESCRIPTION CMD...
    local d=$1; shift
    if "$@"; then pass=$((pass+1)); log "ok: $d"; else fail=$((fail+1)); log "FAIL: $d"; fi
  }
  local agnhost=registry.k8s.io/e2e-test-images/agnhost:2.66.1
  kc create namespace smoke >&2
  kc -n smoke apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec:
  containers: [{name: c, image: $agnhost, args: [netexec, --http-port=8080], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers: [{name: c, image: $agnhost, args: [pause]}]
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, labels: {app: intruder}}
spec:
  containers: [{name: c, image: $agnhost, args: [pause]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080, protocol: TCP}]
EOF
  kc -n smoke wait --for=condition=Ready pod --all --timeout=180s >&2 || { kc -n smoke describe pods >&2 | tail -60; die "smoke pods not ready"; }
  ip=$(kc -n smoke get pod server -o jsonpath='{.status.podIP}')
  connect() { kc -n smoke exec "$1" -- /agnhost connect "$ip:8080" --timeout=3s --protocol=tcp >&2; }
  # Control: with the policy in place but no enforcer, the intruder gets through.
  check "control, before sluice: intruder -> server:8080 connects" connect intruder
  install_sluice
  check "client -> server:8080 allowed" connect client
  check "intruder -> server:8080 dropped" eval '! connect intruder'
  check "the drop is in kubectl logs of the DaemonSet" eval \
    "kc -n kube-system logs ds/sluice | grep 'packet dropped' | grep '\"src\":\"smoke/intruder\"' >/dev/null"
  check "the agent runs unprivileged with NET_ADMIN and NET_RAW only" eval \
    "[ \"\$(kc -n kube-system get ds sluice -o jsonpath='{.spec.template.spec.containers[0].securityContext.capabilities.add}')\" = '[\"NET_ADMIN\",\"NET_RAW\"]' ]"
  kc -n kube-system logs ds/sluice | grep 'packet dropped' | tail -n 3 >&2 || true
  echo "smoke: $pass passed, $fail failed"
  [ "$fail" = 0 ]
}

# run_suite LABEL: one run of the upstream suite; leaves "N passed, M failed" in $work/LABEL.sum
run_suite() {
  local label=$1 t0 rc=0
  t0=$(date +%s)
  log "suite ($label): e2e.test --provider=local --ginkgo.focus='${E2E_FOCUS:-Netpol}' --ginkgo.skip='${E2E_SKIP:-SCTP}'"
  innode "$assets/e2e.test" --provider=local --kubeconfig="$K8S_ROOT/admin.kubeconfig" \
    --ginkgo.focus="${E2E_FOCUS:-Netpol}" --ginkgo.skip="${E2E_SKIP:-SCTP}" --ginkgo.no-color \
    --ginkgo.timeout=4h --ginkgo.junit-report="$work/$label.junit.xml" \
    --disable-log-dump --e2e-output-dir="$work/$label" >"$work/$label.log" 2>&1 || rc=$?
  took[suite-$label]=$(( $(date +%s) - t0 ))
  # Ginkgo's summary: "Ran 40 of 7000 Specs" and "SUCCESS! -- 40 Passed | 0 Failed | ...".
  local passed failed
  passed=$(sed -n 's/.*-- \([0-9]*\) Passed | \([0-9]*\) Failed.*/\1/p' "$work/$label.log" | tail -1)
  failed=$(sed -n 's/.*-- \([0-9]*\) Passed | \([0-9]*\) Failed.*/\2/p' "$work/$label.log" | tail -1)
  [ -n "$passed" ] || { tail -n 50 "$work/$label.log" >&2; die "suite ($label) printed no summary (exit $rc)"; }
  echo "$passed passed, $failed failed" >"$work/$label.sum"
  grep -o '\[FAIL\] .*' "$work/$label.log" | sed 's/ \[It\]//' | sort -u >"$work/$label.failed" || true
  # The specs that passed, from the JUnit report (Ginkgo prints only a dot for them).
  grep -o '<testcase name="\[It\] [^"]*"[^>]*status="passed"' "$work/$label.junit.xml" |
    sed 's/<testcase name="\[It\] \([^"]*\)".*/\1/' | sort -u >"$work/$label.passed" || true
  log "suite ($label): $(cat "$work/$label.sum") in ${took[suite-$label]} s"
}

suite() {
  local results=${1:-}
  run_suite control
  install_sluice
  run_suite sluice
  local logs=/tmp/sluice-e2e-k8s-logs
  mkdir -p "$logs" && cp "$work"/*.log "$work"/*.junit.xml "$work"/*.failed "$logs/" 2>/dev/null || true
  log "suite logs in $logs"
  if [ -n "$results" ]; then
    {
      echo "# Upstream NetworkPolicy e2e suite against sluice"
      echo
      echo "Written by \`bash hack/e2e-k8s.sh suite $results\` (\`make e2e-k8s\`) on $(date -u +%Y-%m-%d), sluice $version,"
      echo "Kubernetes $K8S_VERSION components built here, $(nproc) vCPU. One node in one network namespace:"
      echo "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd $(containerd --version | awk '{print $3}') + runc (Debian),"
      echo "ptp CNI, kubelet, kube-proxy (iptables mode); sluice from \`deploy/\` as a DaemonSet."
      echo
      echo "Suite: \`e2e.test --provider=local --ginkgo.focus='${E2E_FOCUS:-Netpol}' --ginkgo.skip='${E2E_SKIP:-SCTP}'\`"
      echo
      echo "| run | result | time |"
      echo "|---|---|---|"
      echo "| control (no NetworkPolicy enforcer) | $(cat "$work/control.sum") | ${took[suite-control]} s |"
      echo "| with sluice | $(cat "$work/sluice.sum") | ${took[suite-sluice]} s |"
      echo
      echo "| phase | time |"
      echo "|---|---|"
      for k in deps kube-assets images cluster-start; do echo "| $k | ${took[$k]} s |"; done
      echo
      echo "Specs run: $(sed -n 's/^Ran \([0-9]* of [0-9]*\) Specs.*/\1/p' "$work/sluice.log" | tail -1)"
      echo
      echo "Cold builds, as recorded in the cache when it was filled (\`$assets/build-times.txt\`;"
      echo "builds on a shared machine unless the line says otherwise):"
      echo
      if [ -f "$assets/build-times.txt" ]; then sed 's/^/- /' "$assets/build-times.txt"; else echo "- not recorded"; fi
      echo
      echo "## Control run's failures (the suite fails without an enforcer)"
      echo
      sed 's/^/- /' "$work/control.failed"
      echo
      echo "The control's passes (no enforcement needed: API specs, or every flow allowed):"
      echo
      sed 's/^/- /' "$work/control.passed"
      echo
      echo "## Failures with sluice"
      echo
      if [ -s "$work/sluice.failed" ]; then sed 's/^/- /' "$work/sluice.failed"; else echo "none"; fi
    } >"$results"
    log "results in $results"
  fi
  echo "$(cat "$work/sluice.sum")"
  [ "$(cut -d' ' -f3 "$work/sluice.sum")" = 0 ]
}

case "$cmd" in
  smoke) smoke ;;
  suite) suite "${2:-}" ;;
esac
