package filter

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
)

func tcp4(t testing.TB, src, dst net.IP, sport, dport uint16, syn, ack bool) []byte {
	nw := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src, DstIP: dst}
	return ser(t, nw, tcpSeg(sport, dport, syn, ack, nw))
}

// drain writes every pending log record synchronously.
func drain(d *Dataplane) {
	for {
		select {
		case r := <-d.logw.ch:
			d.logw.write(r)
		default:
			return
		}
	}
}

func TestHandleCountsLogsAndDoesNotAllocate(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	d := New(Config{Log: log, LogEvery: time.Hour})
	w := d.workers[0]
	allowed := tcp4(t, fe.AsSlice(), be.AsSlice(), 40000, 8080, true, false)
	denied := tcp4(t, be.AsSlice(), fe.AsSlice(), 40000, 22, true, false)
	now := time.Now().UnixNano()
	if !w.handle(denied, now) {
		t.Fatal("before the first snapshot everything must be accepted")
	}
	d.Publish(compileTest(t, 1, ""))
	if !w.handle(allowed, now) {
		t.Fatal("allowed flow dropped")
	}
	if w.handle(denied, now) {
		t.Fatal("denied flow accepted")
	}
	w.handle(denied, now+1) // a retransmission: counted, not logged again
	drain(d)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	var drops []map[string]any
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("bad log line %q: %v", l, err)
		}
		if m["msg"] == "packet dropped" {
			drops = append(drops, m)
		}
	}
	if len(drops) != 1 {
		t.Fatalf("want exactly one drop line (rate limit), got %d:\n%s", len(drops), buf.String())
	}
	m := drops[0]
	for k, want := range map[string]any{"src": "prod/backend", "dst": "prod/frontend", "proto": "TCP",
		"port": float64(22), "verdict": "drop", "reason": "ingress-denied", "policies": "prod/deny-all-ingress"} {
		if m[k] != want {
			t.Errorf("log %s = %v, want %v (line %v)", k, m[k], want, m)
		}
	}
	if why, _ := m["why"].(string); why == "" {
		t.Errorf("drop line without the explanation: %v", m)
	}
	if got := testCounter(t, d, "drop", "ingress-denied"); got != 2 {
		t.Errorf("drop counter %v, want 2", got)
	}
	if got := testCounter(t, d, "accept", "no-snapshot"); got != 1 {
		t.Errorf("no-snapshot counter %v, want 1", got)
	}
	// Accepts and repeated drops cost no allocation.
	if n := testing.AllocsPerRun(1000, func() { w.handle(allowed, now) }); n != 0 {
		t.Errorf("accept path: %v allocs", n)
	}
	if n := testing.AllocsPerRun(1000, func() { w.handle(denied, now+2) }); n != 0 {
		t.Errorf("rate-limited drop path: %v allocs", n)
	}
}

func TestAuditAcceptsAndLogs(t *testing.T) {
	var buf bytes.Buffer
	d := New(Config{Log: slog.New(slog.NewTextHandler(&buf, nil)), Audit: true})
	d.Publish(compileTest(t, 1, ""))
	w := d.workers[0]
	if !w.handle(tcp4(t, be.AsSlice(), fe.AsSlice(), 1, 22, true, false), time.Now().UnixNano()) {
		t.Fatal("audit mode dropped a packet")
	}
	drain(d)
	if !strings.Contains(buf.String(), "would be dropped") || !strings.Contains(buf.String(), "verdict=audit-drop") {
		t.Fatalf("audit line missing:\n%s", buf.String())
	}
	if got := testCounter(t, d, "audit-drop", "ingress-denied"); got != 1 {
		t.Errorf("audit counter %v", got)
	}
}

func TestWatchdog(t *testing.T) {
	stuck := 0
	d := New(Config{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Queues: 2, QueueNum: 7,
		Stall: 2 * time.Second, Exit: 10 * time.Second, OnStuck: func() { stuck++ }})
	sec := int64(time.Second)
	t0 := time.Now().UnixNano()
	for _, w := range d.workers {
		w.progress.Store(t0)
	}
	// A packet arrives on queue 8 and nothing happens: not stuck at once...
	d.check(t0, map[uint16]uint64{8: 1})
	d.check(t0+sec, map[uint16]uint64{8: 1})
	if d.Health() != nil {
		t.Fatal("unhealthy after 1 s")
	}
	// ...unhealthy after Stall...
	d.check(t0+3*sec, map[uint16]uint64{8: 1})
	if err := d.Health(); err == nil || !strings.Contains(err.Error(), "queue 8") {
		t.Fatalf("health after 3 s of no progress: %v", err)
	}
	// ...and OnStuck after Exit.
	d.check(t0+14*sec, map[uint16]uint64{8: 1})
	if stuck != 1 {
		t.Fatalf("OnStuck called %d times", stuck)
	}
	// Progress heals.
	d.workers[1].progress.Store(t0 + 15*sec)
	d.check(t0+15*sec, map[uint16]uint64{8: 1})
	d.check(t0+16*sec, map[uint16]uint64{8: 0})
	if err := d.Health(); err != nil {
		t.Fatalf("still unhealthy after progress: %v", err)
	}
	// A worker stuck inside one packet, with an empty queue.
	d.workers[0].busySince.Store(t0 + 16*sec)
	d.check(t0+19*sec, nil)
	if d.Health() == nil {
		t.Fatal("worker busy for 3 s not reported")
	}
}

func testCounter(t *testing.T, d *Dataplane, verdict, reason string) float64 {
	t.Helper()
	mfs, err := d.m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "sluice_packets_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["verdict"] == verdict && l["reason"] == reason {
				return m.GetCounter().GetValue()
			}
		}
	}
	return -1
}
