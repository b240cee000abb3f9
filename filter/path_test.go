package filter

import (
	"bytes"
	"encoding/json"
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
func drain(e *Engine) {
	for {
		select {
		case r := <-e.logw.ch:
			e.logw.write(r)
		default:
			return
		}
	}
}

func TestHandleCountsLogsAndDoesNotAllocate(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	d := NewEngine(Config{Log: log, LogEvery: time.Hour, FailOpen: true})
	w := d.NewPath(0)
	allowed := tcp4(t, fe.AsSlice(), be.AsSlice(), 40000, 8080, true, false)
	denied := tcp4(t, be.AsSlice(), fe.AsSlice(), 40000, 22, true, false)
	now := time.Now().UnixNano()
	if !w.Handle(denied, time.Unix(0, now)) {
		t.Fatal("before the first snapshot everything must be accepted when failing open")
	}
	if closed := NewEngine(Config{Log: log}).NewPath(0); closed.Handle(allowed, time.Unix(0, now)) {
		t.Fatal("before the first snapshot everything must be dropped when failing closed")
	}
	d.Publish(compileTest(t, 1, ""))
	if !w.Handle(allowed, time.Unix(0, now)) {
		t.Fatal("allowed flow dropped")
	}
	if w.Handle(denied, time.Unix(0, now)) {
		t.Fatal("denied flow accepted")
	}
	w.Handle(denied, time.Unix(0, now+1)) // a retransmission: counted, not logged again
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
	if n := testing.AllocsPerRun(1000, func() { w.Handle(allowed, time.Unix(0, now)) }); n != 0 {
		t.Errorf("accept path: %v allocs", n)
	}
	if n := testing.AllocsPerRun(1000, func() { w.Handle(denied, time.Unix(0, now+2)) }); n != 0 {
		t.Errorf("rate-limited drop path: %v allocs", n)
	}
}

func TestAuditAcceptsAndLogs(t *testing.T) {
	var buf bytes.Buffer
	d := NewEngine(Config{Log: slog.New(slog.NewTextHandler(&buf, nil)), Audit: true})
	d.Publish(compileTest(t, 1, ""))
	w := d.NewPath(0)
	if !w.Handle(tcp4(t, be.AsSlice(), fe.AsSlice(), 1, 22, true, false), time.Now()) {
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

func testCounter(t *testing.T, e *Engine, verdict, reason string) float64 {
	t.Helper()
	c := e.Counters()
	got := -1.0
	c.EachPacket(func(v Verdict, r Reason, n uint64) {
		if v.String() == verdict && r.String() == reason {
			got = float64(n)
		}
	})
	return got
}
