package kubenode

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
)

// KubeProxy says how to run kube-proxy in a node namespace.
type KubeProxy struct {
	Binary     string // kube-proxy, built by hack/kube-assets.sh
	Kubeconfig string
	NodeName   string // the Node object it serves; its InternalIP is the node's address
	Mode       string // "iptables" or "nftables" (this kernel has no IPVS)
	// ClusterCIDR is the pods' range: traffic to a ClusterIP from outside it is masqueraded
	// (and so carries kube-proxy's masquerade mark through FORWARD).
	ClusterCIDR string
	Dir         string // holds the config file
}

// HealthzAddr is where kube-proxy answers /healthz inside its namespace.
const HealthzAddr = "127.0.0.1:10256"

// Config is kube-proxy's configuration file. Settings that differ from a real node's, and why:
// conntrack.maxPerCore 0 (nf_conntrack_max can only be set from the machine's own namespace)
// and oomScoreAdj 0 (this VM lacks CAP_SYS_RESOURCE, and a test must not change the machine's
// OOM choices); the sync periods are short so a test sees its Services programmed at once.
func (k KubeProxy) Config() string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %s
clientConnection:
  kubeconfig: %s
hostnameOverride: %s
clusterCIDR: %s
detectLocalMode: ClusterCIDR
healthzBindAddress: %s
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
iptables:
  minSyncPeriod: 0s
  syncPeriod: 30s
nftables:
  minSyncPeriod: 0s
  syncPeriod: 30s
`, k.Mode, k.Kubeconfig, k.NodeName, k.ClusterCIDR, HealthzAddr)
}

// Start writes the config and starts kube-proxy in the namespace of h (the lab's node).
func (k KubeProxy) Start(h *netlab.Host) (*agentproc.Proc, error) {
	if k.Mode != "iptables" && k.Mode != "nftables" {
		return nil, fmt.Errorf("kubenode: kube-proxy mode %q: use iptables or nftables", k.Mode)
	}
	cfg := filepath.Join(k.Dir, "kube-proxy-"+k.Mode+".yaml")
	if err := os.WriteFile(cfg, []byte(k.Config()), 0o644); err != nil {
		return nil, fmt.Errorf("kubenode: %w", err)
	}
	return Start(h, k.Binary, "--config", cfg, "--v=2")
}

// WaitHealthy polls kube-proxy's /healthz in the namespace of h until it answers 200 (it does
// once its first sync of the rules is done) or wait has passed.
func WaitHealthy(h *netlab.Host, p *agentproc.Proc, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		if p.Exited() {
			return fmt.Errorf("kubenode: kube-proxy exited (%v) before it was healthy; log:\n%s", p.Err(), p.Tail(4000))
		}
		if GetOK(h, "http://"+HealthzAddr+"/healthz") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubenode: kube-proxy not healthy within %v; log:\n%s", wait, p.Tail(4000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
