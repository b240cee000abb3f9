package e2e

// The offload under policy changes (issue 16), with real packets: a change that touches neither
// end of an offloaded flow leaves its kernel entry in place, so repeat connections stay in the
// kernel while the cluster changes elsewhere; a change that touches an end deletes the entry, so
// the new verdict holds from the first packet after it.

import (
	"testing"
	"time"
)

const isolateDatabase = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-database, namespace: production}
spec:
  podSelector: {matchLabels: {app: database}}
  policyTypes: [Ingress]
`

// backendFromDatabase replaces allow-frontend (same name): the backend now takes 8080 from the
// database only.
const backendFromDatabase = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-frontend, namespace: production}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: database}}}]
    ports: [{protocol: TCP, port: 8080}]
`

func TestOffloadFollowsChanges(t *testing.T) {
	w := newWorld(t)
	allowFrontend := example(t, "allow-frontend.yaml")
	w.writeState(allowFrontend)
	a := w.startAgent(w.agentArgs("--state", w.state, w.podIfaces(), "--offload")...)
	server := w.addrPort("backend", false, 8080)
	try := func() error { return exchange(w.hosts["frontend"], 0, server, probeTimeout) }
	queued := func() float64 { return w.metric("sluice_decision_seconds_count") }

	if err := try(); err != nil {
		t.Fatalf("frontend -> backend:8080 (allowed): %v", err)
	}
	if w.pollMetric("sluice_offload_added_total", 0, 5*time.Second) == 0 {
		t.Fatal("the allowed flow was never offloaded")
	}
	before := queued()
	if err := try(); err != nil {
		t.Fatalf("frontend -> backend:8080 once offloaded: %v", err)
	}
	if n := queued(); n != before {
		t.Fatalf("an offloaded connection reached the queue (%v packets judged, want %v); the test needs the kernel to take it", n, before)
	}

	// A change elsewhere: the database is isolated. The frontend's connections stay in the kernel.
	flushes, deleted := w.metric("sluice_offload_flushes_total"), w.metric("sluice_offload_deleted_total")
	w.reload(a, allowFrontend, isolateDatabase)
	w.check([]flow{deny("frontend", "database", tcp, 5432)}) // the change is in force
	before = queued()
	if err := try(); err != nil {
		t.Fatalf("frontend -> backend:8080 after the database's change: %v", err)
	}
	if n := queued(); n != before {
		t.Errorf("after a change that touched neither end, the offloaded connection reached the queue (%v packets judged, want %v)", n, before)
	}
	if f, d := w.metric("sluice_offload_flushes_total"), w.metric("sluice_offload_deleted_total"); f != flushes || d != deleted {
		t.Errorf("a change elsewhere flushed (%v -> %v) or deleted (%v -> %v) offloaded verdicts", flushes, f, deleted, d)
	}

	// A change of the backend's policy: its entry goes, and the connection is dropped at once.
	w.reload(a, backendFromDatabase, isolateDatabase)
	if err := try(); err == nil || !isTimeout(err) {
		t.Fatalf("frontend -> backend:8080 after the backend stopped allowing the frontend: %v, want dropped; the kernel kept the old allow", err)
	}
	if f, d := w.metric("sluice_offload_flushes_total"), w.metric("sluice_offload_deleted_total"); f != flushes || d <= deleted {
		t.Errorf("the backend's change: flushes %v -> %v (want none), deleted %v -> %v (want more)", flushes, f, deleted, d)
	}
	w.check([]flow{allow("database", "backend", tcp, 8080)})
}
