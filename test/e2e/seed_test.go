package e2e

import (
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/netlab"
)

const (
	tcp  = netlab.TCP
	udp  = netlab.UDP
	sctp = netlab.SCTP
)

func allow(from, to string, p netlab.Proto, port uint16) flow {
	return flow{from: from, to: to, proto: p, port: port, want: true}
}
func deny(from, to string, p netlab.Proto, port uint16) flow {
	return flow{from: from, to: to, proto: p, port: port}
}
func v6(f flow) flow { f.v6 = true; return f }

// seedScenarios are the seed guide's examples, each with the flows that show what it does,
// asserted with real connections. Written by hand from the guide; check() also makes sure the
// policy engine agrees before any packet is sent.
func seedScenarios(t *testing.T) []struct {
	name     string
	policies []string
	flows    []flow
} {
	return []struct {
		name     string
		policies []string
		flows    []flow
	}{
		{"no policy: everything flows", nil, []flow{
			allow("other", "backend", tcp, 8080),
			allow("decoy", "database", tcp, 5432),
			allow("prometheus", "frontend", udp, 53),
			allow("ext-web", "frontend", tcp, 80),
			allow("frontend", "backend", sctp, 3868),
			v6(allow("other", "backend", tcp, 8080)),
		}},
		{"default deny ingress", []string{example(t, "default-deny-ingress.yaml")}, []flow{
			deny("prometheus", "frontend", tcp, 80),
			deny("other", "backend", tcp, 8080),
			deny("frontend", "backend", tcp, 8080), // same namespace: still isolated
			deny("prometheus", "frontend", udp, 53),
			deny("ext-web", "frontend", tcp, 80),
			deny("frontend", "backend", sctp, 3868),
			v6(deny("other", "backend", tcp, 8080)),
			allow("frontend", "prometheus", tcp, 9090), // egress untouched
			allow("backend", "coredns", udp, 53),
			allow("decoy", "coredns", tcp, 80),
			allow("backend", "ext-web", tcp, 80),
		}},
		{"default deny egress with the DNS allowance", []string{example(t, "default-deny-egress.yaml"), example(t, "allow-dns.yaml")}, []flow{
			allow("frontend", "coredns", udp, 53),
			allow("backend", "coredns", udp, 53),
			deny("frontend", "coredns", tcp, 80), // only UDP 53
			deny("frontend", "decoy", udp, 53),   // not kube-dns
			deny("frontend", "backend", tcp, 8080),
			deny("other", "prometheus", tcp, 9090),
			deny("backend", "ext-db", tcp, 5432),
			v6(deny("frontend", "backend", tcp, 8080)),
			allow("prometheus", "frontend", tcp, 80), // ingress untouched
			allow("decoy", "coredns", udp, 53),       // not in production
		}},
		{"allow ingress from specific pods and port", []string{example(t, "allow-frontend.yaml")}, []flow{
			allow("frontend", "backend", tcp, 8080),
			v6(allow("frontend", "backend", tcp, 8080)),
			deny("frontend", "backend", tcp, 80),  // wrong port
			deny("frontend", "backend", udp, 53),  // wrong protocol
			deny("other", "backend", tcp, 8080),   // not a frontend
			deny("decoy", "backend", tcp, 8080),   // frontend labels, other namespace
			deny("ext-web", "backend", tcp, 8080), // outside
			v6(deny("other", "backend", tcp, 8080)),
			allow("other", "database", tcp, 5432), // database not selected
			allow("backend", "frontend", tcp, 80),
		}},
		{"allow from a namespace", []string{example(t, "allow-from-monitoring.yaml")}, []flow{
			allow("prometheus", "frontend", tcp, 80),
			allow("prometheus", "backend", tcp, 8080),
			allow("prometheus", "database", udp, 53),
			deny("coredns", "frontend", tcp, 80),
			deny("frontend", "backend", tcp, 8080),
			deny("decoy", "frontend", tcp, 80),
			allow("frontend", "coredns", udp, 53), // kube-system not isolated
		}},
		{"egress to an ipBlock", []string{example(t, "allow-external-db.yaml")}, []flow{
			allow("backend", "ext-db", tcp, 5432),
			deny("backend", "ext-db", tcp, 80),       // port
			deny("backend", "ext-web", tcp, 5432),    // outside the block
			deny("backend", "database", tcp, 5432),   // pod IP outside the block
			deny("backend", "coredns", udp, 53),      // no DNS allowance here
			allow("frontend", "ext-db", tcp, 80),     // frontend not selected
			allow("ext-db", "backend", tcp, 8080),    // ingress untouched
			allow("frontend", "backend", sctp, 3868), // ingress untouched
		}},
		{"three-tier application", []string{example(t, "three-tier.yaml")}, []flow{
			allow("ext-web", "frontend", tcp, 80),
			allow("other", "frontend", tcp, 80),
			allow("decoy", "frontend", tcp, 80),
			deny("other", "frontend", tcp, 8080),
			deny("ext-web", "frontend", udp, 53),
			allow("frontend", "backend", tcp, 8080),
			v6(allow("frontend", "backend", tcp, 8080)),
			deny("frontend", "backend", tcp, 80),
			deny("other", "backend", tcp, 8080),
			v6(deny("other", "backend", tcp, 8080)),
			deny("decoy", "backend", tcp, 8080),
			deny("database", "backend", tcp, 8080),
			allow("backend", "database", tcp, 5432),
			v6(allow("backend", "database", tcp, 5432)),
			deny("frontend", "database", tcp, 5432),
			deny("other", "database", tcp, 5432),
			deny("backend", "frontend", tcp, 80), // backend egress: database only
			allow("frontend", "coredns", udp, 53),
			deny("frontend", "ext-web", tcp, 80),
			deny("backend", "coredns", udp, 53), // backend has no DNS rule
			deny("frontend", "backend", sctp, 3868),
		}},
	}
}

// TestSeedExamples runs one agent and switches its state file from one seed example to the
// next, asserting every flow with real packets after each reload.
func TestSeedExamples(t *testing.T) {
	w := newWorld(t)
	w.writeState()
	a := w.startAgent("--state", w.state, "--fail-open=false")
	for i, sc := range seedScenarios(t) {
		t.Run(sc.name, func(t *testing.T) {
			ww := *w
			ww.t = t
			if i > 0 {
				ww.reload(a, sc.policies...)
			}
			ww.check(sc.flows)
		})
	}
	if got := w.metric(`sluice_packets_total{reason="ingress-denied",verdict="drop"}`); got == 0 {
		t.Errorf("no ingress drop counted in the metrics")
	}
	if n := w.metric("sluice_decision_seconds_count"); n > 0 {
		t.Logf("%v queued packets, mean user-space time per packet %.1f µs (sluice_decision_seconds)",
			n, w.metric("sluice_decision_seconds_sum")/n*1e6)
	}
}

// TestSCTP allows SCTP to one port from one pod and checks INIT chunks both ways.
func TestSCTP(t *testing.T) {
	w := newWorld(t)
	w.writeState(`
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sctp-from-frontend, namespace: production}
spec:
  podSelector: {matchLabels: {tier: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {tier: frontend}}}]
    ports: [{protocol: SCTP, port: 3868}]
`)
	a := w.startAgent("--state", w.state, "-v", "1")
	w.check([]flow{
		allow("frontend", "backend", sctp, 3868),
		v6(allow("frontend", "backend", sctp, 3868)),
		deny("other", "backend", sctp, 3868),
		v6(deny("other", "backend", sctp, 3868)),
		deny("frontend", "backend", tcp, 8080),
		allow("backend", "frontend", sctp, 3868),
	})
	// -v 1 logs accepted connections too.
	a.waitLog(`msg="packet accepted" verdict=accept src=production/frontend dst=production/backend proto=SCTP port=3868 reason=rule`, 5*time.Second)
	a.waitLog(`msg="packet dropped" verdict=drop src=production/other dst=production/backend proto=SCTP port=3868 reason=ingress-denied`, 5*time.Second)
}

// With --node only the pods scheduled on this node are enforced here: their egress and their
// ingress. A remote pod's ingress is its own node's job, and traffic between two remote pods
// does not concern this node at all.
func TestNodeLocalPods(t *testing.T) {
	w := newWorld(t)
	w.node = "node-a"
	w.nodes = map[string]string{"frontend": "node-a", "backend": "node-a", "database": "node-b",
		"other": "node-b", "prometheus": "node-b", "coredns": "node-b", "decoy": "node-a"}
	w.writeState(example(t, "default-deny-ingress.yaml"), example(t, "default-deny-egress.yaml"))
	// In the lab every pod hangs off the node namespace; on a real node only node-a's pods are
	// on its pod interfaces, which is what the agent is told.
	w.startAgent("--state", w.state, "--node", "node-a", "--fail-open=false",
		"--pod-interfaces="+w.podInterfaces("frontend", "backend", "decoy"))
	w.check([]flow{
		deny("other", "backend", tcp, 8080),     // local destination isolated for ingress
		deny("backend", "prometheus", tcp, 80),  // local source isolated for egress
		deny("frontend", "backend", tcp, 8080),  // both local
		allow("other", "database", tcp, 5432),   // both remote: not this node's business
		allow("prometheus", "other", udp, 53),   // both remote
		allow("decoy", "database", tcp, 5432),   // local unisolated source; remote ingress is node-b's job
		allow("ext-web", "prometheus", tcp, 80), // outside to remote
	})
}
