package filter

import (
	"io"
	"log/slog"
	"testing"
	"time"
)

// BenchmarkDecode is the header decode of a TCP SYN with Linux's five options.
func BenchmarkDecode(b *testing.B) {
	data := decodeCases(b)[0].data
	d := NewDecoder()
	var p Packet
	b.ReportAllocs()
	for b.Loop() {
		d.Decode(data, &p)
	}
}

// BenchmarkHandle is the whole user-space decision for one queued packet, without the netlink
// round trip: decode, flow cache, snapshot, counters. hit: the flow is cached; miss: every
// packet is a new generation, so Decide runs each time.
func BenchmarkHandle(b *testing.B) {
	for _, bc := range []struct {
		name string
		miss bool
	}{{"hit", false}, {"miss", true}} {
		b.Run(bc.name, func(b *testing.B) {
			d := NewEngine(Config{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
			s1, s2 := compileTest(b, 1, ""), compileTest(b, 2, "")
			d.Publish(s1)
			w := d.NewPath(0)
			data := tcp4(b, fe.AsSlice(), be.AsSlice(), 40000, 8080, true, false)
			now := time.Now()
			w.Handle(data, now)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if bc.miss {
					i++
					if i%2 == 0 {
						d.snap.Store(s1)
					} else {
						d.snap.Store(s2)
					}
				}
				w.Handle(data, now)
			}
		})
	}
}
