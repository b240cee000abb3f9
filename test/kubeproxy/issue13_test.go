package kubeproxy

import "testing"

// The scenarios that need the agent's node-integrity fixes (issue 13) in kube-proxy's iptables
// mode, where kube-proxy's rules share the filter table's FORWARD chain with sluice's jump.

// TestKubeProxyAfterSluiceKeepsSluiceFirst: kube-proxy started after the agent prepends its
// KUBE-FORWARD jump, which accepts every packet carrying its masquerade mark (a hairpin, a client
// outside the cluster CIDR) before sluice's jump sees it. The agent must put its jump back in
// front within its resync interval, so those denied flows are dropped.
func TestKubeProxyAfterSluiceKeepsSluiceFirst(t *testing.T) {
	runScenarios(t, []scenario{{mode: "iptables", proxyFirst: false, flows: []flow{frontendToBackend, backendHairpin, dbHairpin, internetToBackend}}})
}

// TestNoEndpointsRejectedBehindSluice: with sluice's jump in front of kube-proxy's, a connection
// to a Service without endpoints must still meet kube-proxy's REJECT (filter KUBE-SERVICES,
// after sluice's jump in FORWARD): sluice's verdict means "policy allows", not "accept".
func TestNoEndpointsRejectedBehindSluice(t *testing.T) {
	runScenarios(t, []scenario{{mode: "iptables", proxyFirst: true, flows: []flow{frontendToBackend}, noEndpoints: true}})
}
