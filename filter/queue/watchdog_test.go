package queue

import (
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestWatchdog(t *testing.T) {
	stuck := 0
	d, err := New(Config{Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Spec: Spec{First: 7, Count: 2},
		Handler: func(uint16) Handler { return nil },
		Stall:   2 * time.Second, Exit: 10 * time.Second, OnStuck: func() { stuck++ }})
	if err != nil {
		t.Fatal(err)
	}
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
