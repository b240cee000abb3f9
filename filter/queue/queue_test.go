package queue

import (
	"context"
	"log/slog"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/filter/nfq/nfqtest"
	"github.com/sluice-dev/sluice/internal/netlab"
	"github.com/sluice-dev/sluice/policy"
)

// The agent's whole packet path on a real queue: the reader (filter/nfq), the filter's judge
// (decode, flow cache, return table, the compiled snapshot) and its counters, fed by real
// datagrams forwarded through a lab node's NFQUEUE rule.

const pathState = `
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {role: client}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.78.1.2, podIPs: [{ip: 10.78.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {role: server}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.78.2.2, podIPs: [{ip: 10.78.2.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-udp-9999, namespace: app}
spec:
  podSelector: {matchLabels: {role: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{protocol: UDP, port: 9999}]
`

var (
	clientIP = netip.MustParseAddr("10.78.1.2")
	serverIP = netip.MustParseAddr("10.78.2.2")
)

func TestWholePathAllocatesNothingPerPacket(t *testing.T) {
	nfqtest.RequireLab(t)
	l := netlab.NewT(t)
	cli, err := l.AddHost("client", clientIP)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := l.AddHost("server", serverIP)
	if err != nil {
		t.Fatal(err)
	}
	// As the agent's rules do: a packet judged and given back with the pass mark (NF_REPEAT)
	// leaves the queue rule behind on its second pass.
	for _, r := range []string{"-A FORWARD -m mark --mark 0x400000/0x400000 -j ACCEPT", "-A FORWARD -p udp -j NFQUEUE --queue-num 240"} {
		if out, err := l.NodeExec("iptables", strings.Fields(r)...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	st, _, err := policy.Load(strings.NewReader(pathState), "test")
	if err != nil {
		t.Fatal(err)
	}
	snap, err := policy.Compile(st, policy.Options{Generation: 1})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	eng := filter.NewEngine(filter.Config{Log: log})
	eng.Publish(snap)
	q, err := New(Config{Spec: Spec{First: 240, Count: 1}, Mark: 0x400000,
		Handler: func(n uint16) Handler { return eng.NewPath(n) }, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var done <-chan struct{}
	if err := l.Node().Do(func() (err error) { done, err = q.Run(ctx); return err }); err != nil {
		cancel()
		t.Fatal(err)
	}
	defer func() { cancel(); <-done }()
	go eng.RunLog(ctx)

	allowed, denied := nfqtest.Sink(t, srv, 9999), nfqtest.Sink(t, srv, 9998)
	fa, fd := nfqtest.Sender(t, cli, serverIP, 9999), nfqtest.Sender(t, cli, serverIP, 9998)
	payload := make([]byte, 64)
	// The denied port first: the path really judges (the sink sees nothing, the drops are
	// counted), and its one log line is written before the measurement.
	for i := 0; i < 50; i++ {
		unix.Write(fd, payload)
	}
	var sent uint64
	send := func(n int) {
		for i := 0; i < n; i++ {
			// At most 512 in flight: every datagram takes the round trip through the agent.
			for sent > allowed.Load()+512 {
				time.Sleep(100 * time.Microsecond)
			}
			unix.Write(fa, payload)
			sent++
		}
	}
	send(1000) // warm-up: the flow cache, the return table, the reader's thread
	waitFor := func(want uint64) bool {
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			if allowed.Load() >= want {
				return true
			}
		}
		return false
	}
	if !waitFor(1000) {
		t.Fatalf("warm-up: %d of 1000 allowed datagrams arrived", allowed.Load())
	}
	const n = 10000
	before0 := eng.Counters()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	send(n)
	ok := waitFor(1000 + n)
	runtime.ReadMemStats(&after)
	if !ok {
		t.Fatalf("%d of %d allowed datagrams arrived", allowed.Load()-1000, n)
	}
	mallocs := after.Mallocs - before.Mallocs
	c := eng.Counters()
	var judged uint64
	for v := range c.Packets {
		for r := range c.Packets[v] {
			judged += c.Packets[v][r] - before0.Packets[v][r]
		}
	}
	t.Logf("%d datagrams judged by the whole path, %d mallocs in the whole process", judged, mallocs)
	if judged < n {
		t.Errorf("the path judged %d packets, want at least %d", judged, n)
	}
	// One allocation per packet would be 10000; the tolerance (1 per 100 packets) leaves room
	// for the runtime's and the test's own background work, two orders of magnitude below.
	if mallocs > n/100 {
		t.Errorf("%d mallocs for %d packets (%.3f per packet)", mallocs, n, float64(mallocs)/n)
	}
	if got := denied.Load(); got != 0 {
		t.Errorf("%d datagrams to the denied port got through", got)
	}
	var loops dto.Metric
	q.m.markLoops.Write(&loops)
	if n := loops.GetCounter().GetValue(); n != 0 {
		t.Errorf("%v packets came back with the pass mark", n)
	}
	if c.Packet(filter.Drop, filter.ReasonIngressDenied) < 50 {
		t.Errorf("drops counted: %d, want 50", c.Packet(filter.Drop, filter.ReasonIngressDenied))
	}
}
