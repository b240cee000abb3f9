package policy

import (
	"net/netip"
	"slices"
	"sync/atomic"
)

// Verdict caches (a worker's flow cache, the kernel offload sets) hold answers of older
// snapshots. A Builder's patch changes the verdicts of few flows: only those with an end at an
// address whose owner, isolation, named ports or peer set memberships it touched. The snapshot
// keeps those addresses for its last generations, so a cache can keep every other answer
// instead of starting over at each generation.
//
// Why the addresses are enough: Decide reads, for each end, the pod that owns its address (the
// address shards), that pod's isolation and rule lists and named ports (its hot entry), and the
// peer sets' membership of the other end's pod. Rules, entries and lists are append-only, and a
// policy change that alters what a pod's lists point to re-isolates that pod. So a patch that
// records the addresses of every pod whose hot entry, ownership or set membership it writes
// leaves every flow between two other addresses with the verdict it had.

// serials numbers every snapshot of the process, whichever source or Builder made it, so that
// a cache cannot confuse two snapshots that happen to share a generation.
var serials atomic.Uint64

// change is one patch: the addresses whose flows may have changed verdict since the snapshot
// with serial from, sorted.
type change struct {
	from  uint64
	addrs []netip.Addr
}

const (
	// keptChanges bounds how many patches back a snapshot can vouch for an older answer.
	keptChanges = 64
	// maxChangeAddrs: a patch that touches more addresses than this (a namespace relabel with
	// many pods) vouches for nothing, as a full compile does; looking the flows up again is
	// cheaper than keeping and searching such lists.
	maxChangeAddrs = 4096
)

// Serial identifies the snapshot among all of the process: a different snapshot has a
// different serial, and a later one a higher serial.
func (s *Snapshot) Serial() uint64 { return s.serial }

// Unchanged reports whether s gives flow f the verdict the snapshot with serial since gave it,
// as far as s knows: true for s itself and for an ancestor s was patched from within its last
// patches when neither end of f was touched since. False says nothing (decide again). It never
// allocates and takes no lock, for the packet path.
func (s *Snapshot) Unchanged(f Flow, since uint64) bool {
	if since == s.serial {
		return true
	}
	for i := len(s.changes) - 1; i >= 0; i-- {
		c := &s.changes[i]
		if c.touches(f.Src) || c.touches(f.Dst) {
			return false
		}
		if c.from == since {
			return true
		}
	}
	return false
}

// ChangedSince returns the addresses whose flows may have another verdict in s than in the
// snapshot with serial since, and false when s cannot tell (since is no ancestor within its
// last patches, or a full compile came between): then every verdict of since is suspect.
func (s *Snapshot) ChangedSince(since uint64) ([]netip.Addr, bool) {
	if since == s.serial {
		return nil, true
	}
	var out []netip.Addr
	for i := len(s.changes) - 1; i >= 0; i-- {
		c := &s.changes[i]
		out = append(out, c.addrs...)
		if c.from == since {
			slices.SortFunc(out, netip.Addr.Compare)
			return slices.Compact(out), true
		}
	}
	return nil, false
}

func (c *change) touches(a netip.Addr) bool {
	if len(c.addrs) <= 8 {
		for _, b := range c.addrs {
			if a == b {
				return true
			}
		}
		return false
	}
	_, found := slices.BinarySearchFunc(c.addrs, a, netip.Addr.Compare)
	return found
}

// touched collects the addresses a patch touches.
type touched map[netip.Addr]struct{}

func (t touched) add(addrs []netip.Addr) {
	for _, a := range addrs {
		t[a] = struct{}{}
	}
}

// record puts a patch from old into s's log: old's log, its oldest entries dropped past
// keptChanges, and this patch. A patch touching too many addresses starts the log afresh.
func (t touched) record(s, old *Snapshot) {
	if len(t) > maxChangeAddrs {
		s.changes = nil
		return
	}
	addrs := make([]netip.Addr, 0, len(t))
	for a := range t {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	kept := old.changes[max(0, len(old.changes)-(keptChanges-1)):]
	cs := make([]change, len(kept), len(kept)+1)
	copy(cs, kept)
	s.changes = append(cs, change{from: old.serial, addrs: addrs})
}
