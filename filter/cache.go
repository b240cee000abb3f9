package filter

import (
	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/sluice-dev/sluice/policy"
)

// DefaultCacheSize is the number of flows each worker remembers.
const DefaultCacheSize = 65536

// cached is a verdict with the serial of the snapshot that gave it, or last vouched for it.
type cached struct {
	serial uint64
	v      policy.Verdict
}

// FlowCache remembers verdicts per flow (source IP, destination IP, protocol, destination port)
// for one worker, so it needs no lock. An entry answers for the snapshot that produced it, and
// for a later one that vouches the flow's verdict is unchanged (Snapshot.Unchanged: neither end
// was touched by the patches between them); otherwise it is decided again and overwritten in
// place. So a pod change elsewhere in the cluster leaves the cache warm, and a full compile
// makes every entry stale without a purge.
//
// simplelru allocates one list element when it adds a new key; a hit, and the refresh of a
// stale key, allocate nothing.
type FlowCache struct {
	lru         *simplelru.LRU[policy.Flow, cached]
	revalidated uint64 // hits on entries of an older snapshot that the current one vouched for
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
	serial := s.Serial()
	if e, ok := c.lru.Get(f); ok {
		if e.serial == serial {
			return e.v, true
		}
		if s.Unchanged(f, e.serial) {
			c.lru.Add(f, cached{serial: serial, v: e.v})
			c.revalidated++
			return e.v, true
		}
	}
	v = s.Decide(f)
	c.lru.Add(f, cached{serial: serial, v: v})
	return v, false
}

// Len is the number of remembered flows (stale ones included).
func (c *FlowCache) Len() int { return c.lru.Len() }
