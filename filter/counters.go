package filter

import (
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// The packet path counts with plain atomics, one set per worker, so that a packet costs an
// uncontended atomic add and this package needs no metrics library (the Prometheus one pulls
// in system calls); the agent exports the sums (Engine.Counters) as Prometheus metrics.

// LatencyBuckets are the upper bounds of the decision-time histogram: 250 ns doubling up to
// about 4 ms, then +Inf.
var LatencyBuckets = func() []time.Duration {
	b := make([]time.Duration, numLatencyBuckets-1)
	for i := range b {
		b[i] = latencyBase << i
	}
	return b
}()

const (
	latencyBase       = 250 * time.Nanosecond
	numLatencyBuckets = 16 // 15 bounds and +Inf
)

// counters is one worker's.
type counters struct {
	packets     [numVerdicts][numReasons]atomic.Uint64
	cacheHits   atomic.Uint64
	cacheMisses atomic.Uint64
	logDropped  atomic.Uint64
	latency     [numLatencyBuckets]atomic.Uint64
	latencySum  atomic.Uint64 // nanoseconds
}

func (c *counters) observe(d time.Duration) {
	ns := uint64(max(d, 0))
	i := 0
	if ns > 0 {
		i = bits.Len64((ns - 1) / uint64(latencyBase))
	}
	c.latency[min(i, numLatencyBuckets-1)].Add(1)
	c.latencySum.Add(ns)
}

// Counters is what the packet path counted since the engine started, summed over workers.
type Counters struct {
	Packets     [numVerdicts][numReasons]uint64
	CacheHits   uint64
	CacheMisses uint64
	// LogDropped counts verdict lines dropped because the log writer fell behind.
	LogDropped uint64
	// Latency counts decision times per bucket of LatencyBuckets (the last is +Inf);
	// LatencySum is their total.
	Latency    [numLatencyBuckets]uint64
	LatencySum time.Duration
	// TableEvicted counts live connections pushed out of a worker's connection table by
	// others; TableRefused openings not recorded because their opener was over its quota.
	TableEvicted, TableRefused uint64
	// Generation is that of the snapshot in force; Snapshots how many were put in force.
	Generation uint64
	Snapshots  uint64
}

// Packet is the count of packets given verdict v for reason r.
func (c *Counters) Packet(v Verdict, r Reason) uint64 {
	if v >= numVerdicts || r >= numReasons {
		return 0
	}
	return c.Packets[v][r]
}

// EachPacket calls f for every verdict and reason, zero counts included, in a fixed order.
func (c *Counters) EachPacket(f func(v Verdict, r Reason, n uint64)) {
	for v := range numVerdicts {
		for r := range numReasons {
			if r == reasonUnmapped {
				continue
			}
			f(v, r, c.Packets[v][r])
		}
	}
}

// counterSet holds every worker's counters.
type counterSet struct {
	mu     sync.Mutex
	all    []*counters
	tables []*returnTable
	// engine-wide
	logDropped atomic.Uint64
	generation atomic.Uint64
	snapshots  atomic.Uint64
}

func (s *counterSet) add() *counters {
	c := &counters{}
	s.mu.Lock()
	s.all = append(s.all, c)
	s.mu.Unlock()
	return c
}

func (s *counterSet) sum() Counters {
	var out Counters
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.all {
		for v := range numVerdicts {
			for r := range numReasons {
				out.Packets[v][r] += c.packets[v][r].Load()
			}
		}
		out.CacheHits += c.cacheHits.Load()
		out.CacheMisses += c.cacheMisses.Load()
		for i := range c.latency {
			out.Latency[i] += c.latency[i].Load()
		}
		out.LatencySum += time.Duration(c.latencySum.Load())
	}
	for _, t := range s.tables {
		out.TableEvicted += t.stats.evicted.Load()
		out.TableRefused += t.stats.overQuota.Load()
	}
	out.LogDropped = s.logDropped.Load()
	out.Generation = s.generation.Load()
	out.Snapshots = s.snapshots.Load()
	return out
}
