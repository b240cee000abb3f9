package filter

import (
	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/sluice-dev/sluice/policy"
)

// DefaultCacheSize is the number of flows each worker remembers.
const DefaultCacheSize = 65536

// cached is a verdict with the generation of the snapshot that gave it.
type cached struct {
	gen uint64
	v   policy.Verdict
}

// FlowCache remembers verdicts per flow (source IP, destination IP, protocol, destination port)
// for one worker, so it needs no lock. An entry is valid only for the snapshot generation that
// produced it: a new snapshot makes every entry stale without a purge, and the stale entry's
// slot is overwritten in place on the next miss.
//
// simplelru allocates one list element when it adds a new key; a hit, and the refresh of a
// stale key, allocate nothing.
type FlowCache struct {
	lru *simplelru.LRU[policy.Flow, cached]
}

// NewFlowCache makes a cache of size entries (DefaultCacheSize when size <= 0).
func NewFlowCache(size int) *FlowCache {
	if size <= 0 {
		size = DefaultCacheSize
	}
	l, err := simplelru.NewLRU[policy.Flow, cached](size, nil)
	if err != nil {
		// Only a non-positive size fails, which is excluded above.
		panic(err)
	}
	return &FlowCache{lru: l}
}

// Decide answers from the cache or asks the snapshot and remembers the answer. hit reports
// whether the cache answered.
func (c *FlowCache) Decide(s *policy.Snapshot, f policy.Flow) (v policy.Verdict, hit bool) {
	gen := s.Generation()
	if e, ok := c.lru.Get(f); ok && e.gen == gen {
		return e.v, true
	}
	v = s.Decide(f)
	c.lru.Add(f, cached{gen: gen, v: v})
	return v, false
}

// Len is the number of remembered flows (stale ones included).
func (c *FlowCache) Len() int { return c.lru.Len() }
