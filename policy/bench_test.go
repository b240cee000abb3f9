package policy_test

import (
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// Benchmarks over the same generated clusters and the same flow mix, so that
// BenchmarkDecide/policies=N and BenchmarkReference/policies=N compare line by line.
//
//	go test ./policy -run '^$' -bench . -benchmem

var benchSizes = []int{100, 1000, 10000}

const (
	benchSeed     = 1
	benchFlowSeed = 2
	benchFlows    = 4096 // a power of two: the loop indexes with a mask
)

type benchCluster struct {
	st    *policy.State
	flows []policy.Flow
}

var (
	benchMu       sync.Mutex
	benchClusters = map[int]*benchCluster{}
)

func benchClusterFor(b *testing.B, n int) *benchCluster {
	b.Helper()
	benchMu.Lock()
	defer benchMu.Unlock()
	if c, ok := benchClusters[n]; ok {
		return c
	}
	st := clustergen.Generate(n, benchSeed)
	c := &benchCluster{st: st, flows: clustergen.Flows(st, benchFlows, benchFlowSeed)}
	benchClusters[n] = c
	return c
}

func BenchmarkDecide(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			c := benchClusterFor(b, n)
			snap, err := policy.Compile(c.st, policy.Options{})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			cpu := startCPU()
			b.ResetTimer()
			var allowed int
			for i := 0; i < b.N; i++ {
				if snap.Decide(c.flows[i&(benchFlows-1)]).Allowed {
					allowed++
				}
			}
			b.StopTimer()
			cpu.report(b)
			if b.N >= benchFlows {
				b.ReportMetric(float64(allowed)/float64(b.N), "allowed/op")
			}
		})
	}
}

func BenchmarkReference(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			c := benchClusterFor(b, n)
			opt := policy.Options{}
			b.ReportAllocs()
			cpu := startCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				policy.ReferenceDecide(c.st, opt, c.flows[i&(benchFlows-1)])
			}
			b.StopTimer()
			cpu.report(b)
		})
	}
}

func BenchmarkCompile(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			c := benchClusterFor(b, n)
			b.ReportAllocs()
			cpu := startCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := policy.Compile(c.st, policy.Options{}); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			cpu.report(b)
			b.ReportMetric(heapOfSnapshotMB(b, c.st), "MB")
		})
	}
}

// heapOfSnapshotMB measures the live heap one compiled snapshot holds (the state it was built
// from is kept alive on both sides of the measurement, so it does not count).
func heapOfSnapshotMB(b *testing.B, st *policy.State) float64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(snap)
	runtime.KeepAlive(st)
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / 1e6
}

// cpuClock reports the process's CPU time per operation next to ns/op. The machines these run
// on are shared, and wall time per op swings with the neighbours' load; CPU time (user+system,
// this process, GC included) shows what the code itself costs.
type cpuClock struct{ start time.Duration }

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func startCPU() cpuClock { return cpuClock{processCPU()} }

func (c cpuClock) report(b *testing.B) {
	if b.N > 0 {
		b.ReportMetric(float64(processCPU()-c.start)/float64(b.N), "cpu-ns/op")
	}
}

// BenchmarkUnchanged is what a flow cache pays to keep an entry of an older snapshot: the
// check across 1 and 63 pod changes (the longest log a snapshot keeps), beside a Decide of the
// same flows (BenchmarkDecide/policies=1000).
func BenchmarkUnchanged(b *testing.B) {
	c := benchClusterFor(b, 1000)
	for _, steps := range []int{1, 63} {
		b.Run(fmt.Sprintf("changes=%d", steps), func(b *testing.B) {
			bl := builderOf(c.st, policy.Options{})
			first, err := bl.Build(1)
			if err != nil {
				b.Fatal(err)
			}
			s := first
			for i := range steps {
				p := *c.st.Pods[i].DeepCopy()
				p.Labels = map[string]string{"moved": "yes"}
				bl.SetPod(&p)
				if s, err = bl.Build(uint64(i + 2)); err != nil {
					b.Fatal(err)
				}
			}
			vouched := 0
			for _, f := range c.flows {
				if s.Unchanged(f, first.Serial()) {
					vouched++
				}
			}
			for i := 0; b.Loop(); i++ {
				s.Unchanged(c.flows[i&(benchFlows-1)], first.Serial())
			}
			b.ReportMetric(100*float64(vouched)/float64(len(c.flows)), "%vouched")
		})
	}
}
