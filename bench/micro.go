package main

// Micro benchmarks, run in-process with testing.Benchmark on the generated cluster the policy
// package's own benchmarks use, so the figures can be set beside `go test ./policy -bench .`.

import (
	"encoding/binary"
	"flag"
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

type microResult struct {
	Name     string  `json:"name"`
	NsPerOp  float64 `json:"ns_per_op"`
	AllocsOp int64   `json:"allocs_per_op"`
	BytesOp  int64   `json:"bytes_per_op"`
	N        int     `json:"n"`
	Note     string  `json:"note,omitempty"`
}

var testingInit = func() func() {
	done := false
	return func() {
		if !done {
			testing.Init()
			done = true
		}
	}
}()

func bench(name string, benchtime time.Duration, f func(b *testing.B)) microResult {
	testingInit()
	flag.Set("test.benchtime", benchtime.String())
	// The garbage of the benchmark before (a 10k-policy compile leaves ~250 MB) would otherwise
	// be collected during this one, on the same two CPUs, and inflate it.
	runtime.GC()
	r := testing.Benchmark(func(b *testing.B) {
		b.ReportAllocs()
		f(b)
	})
	return microResult{Name: name, NsPerOp: float64(r.T.Nanoseconds()) / float64(max(r.N, 1)),
		AllocsOp: r.AllocsPerOp(), BytesOp: r.AllocedBytesPerOp(), N: r.N}
}

// synPacket is an IPv4 TCP SYN as NFQUEUE hands it over (from the IP header on).
func synPacket(src, dst netip.Addr, sport, dport uint16) []byte {
	p := make([]byte, 60)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], 60)
	p[8] = 64
	p[9] = 6
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	t := p[20:]
	binary.BigEndian.PutUint16(t[0:], sport)
	binary.BigEndian.PutUint16(t[2:], dport)
	t[12] = 10 << 4 // 40-byte header with options, as Linux sends a SYN
	t[13] = 0x02
	binary.BigEndian.PutUint16(t[14:], 64240)
	copy(t[20:], []byte{2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7})
	return p
}

func runMicro(policyCounts []int, benchtime time.Duration, progress func(string, ...any)) (out []microResult) {
	add := func(r microResult) {
		progress("micro %-34s %12.1f ns/op %4d allocs/op (n=%d)", r.Name, r.NsPerOp, r.AllocsOp, r.N)
		out = append(out, r)
	}
	var snap1k *policy.Snapshot
	var flows1k []policy.Flow
	for _, n := range policyCounts {
		st := clustergen.Generate(n, 1)
		flows := clustergen.Flows(st, 4096, 1)
		add(bench(fmt.Sprintf("compile/policies=%d", n), benchtime, func(b *testing.B) {
			for b.Loop() {
				if _, err := policy.Compile(st, policy.Options{}); err != nil {
					b.Fatal(err)
				}
			}
		}))
		s, err := policy.Compile(st, policy.Options{})
		if err != nil {
			progress("micro: compile %d policies: %v", n, err)
			continue
		}
		add(bench(fmt.Sprintf("decide/policies=%d", n), benchtime, func(b *testing.B) {
			i := 0
			for b.Loop() {
				s.Decide(flows[i&4095])
				i++
			}
		}))
		if n <= 1000 {
			// The literal evaluator re-reads every policy per flow; at 10k it would take the
			// whole time budget for a handful of iterations.
			add(bench(fmt.Sprintf("reference/policies=%d", n), benchtime, func(b *testing.B) {
				i := 0
				for b.Loop() {
					policy.ReferenceDecide(st, policy.Options{}, flows[i&4095])
					i++
				}
			}))
		}
		if snap1k == nil || n == 1000 {
			snap1k, flows1k = s, flows
		}
	}
	if snap1k != nil {
		c := filter.NewFlowCache(0)
		f := flows1k[0]
		c.Decide(snap1k, f)
		add(bench("cache/hit", benchtime, func(b *testing.B) {
			for b.Loop() {
				c.Decide(snap1k, f)
			}
		}))
		// A cache far smaller than the flow set: every lookup misses, decides and evicts.
		small := filter.NewFlowCache(64)
		add(bench("cache/miss (decide+insert)", benchtime, func(b *testing.B) {
			i := 0
			for b.Loop() {
				small.Decide(snap1k, flows1k[i&4095])
				i++
			}
		}))
	}
	d := filter.NewDecoder()
	pkt := synPacket(clientIP(0), serverIP, 40000, tcpPort)
	var p filter.Packet
	add(bench("decode/tcp-syn-ipv4", benchtime, func(b *testing.B) {
		for b.Loop() {
			d.Decode(pkt, &p)
		}
	}))
	return out
}
