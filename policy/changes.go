package policy

import (
	"cmp"
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
// records the addresses of every pod whose isolation, ownership or set membership it writes
// leaves every flow between two other addresses with the verdict it had. (Laying a pod's named
// ports out again for a name a new policy brings is not recorded: only that policy's rules can
// see the name, and the pods it selects are isolated again, which is.)

// serials numbers every snapshot of the process, whichever source or Builder made it, so that
// a cache cannot confuse two snapshots that happen to share a generation. A patched snapshot
// has a higher serial than the one it was patched from.
var serials atomic.Uint64

// step is one patch of the log: the serial of the snapshot it was patched from and how many
// addresses it touched.
type step struct {
	from  uint64
	addrs int
}

const (
	// keptChanges bounds how many patches back a snapshot can vouch for an older answer.
	keptChanges = 64
	// maxChangeAddrs bounds the addresses the log holds; the oldest patches are forgotten
	// past it. A patch touching more than this alone (a namespace relabel with many pods)
	// vouches for nothing, as a full compile does: looking the flows up again is cheaper
	// than keeping such lists.
	maxChangeAddrs = 4096
)

// Serial identifies the snapshot among all of the process: a different snapshot has a
// different serial.
func (s *Snapshot) Serial() uint64 { return s.serial }

// Unchanged reports whether s gives flow f the verdict the snapshot with serial since gave it,
// as far as s knows: true for s itself, and for an ancestor s was patched from within its last
// patches when none of the patches since touched either end of f. False says nothing (decide
// again). It never allocates and takes no lock, for the packet path; its cost does not grow
// with the number of patches.
func (s *Snapshot) Unchanged(f Flow, since uint64) bool {
	if since == s.serial {
		return true
	}
	if !s.patchedFrom(since) {
		return false
	}
	return s.touchedAt[f.Src] <= since && s.touchedAt[f.Dst] <= since
}

// patchedFrom reports whether since is an ancestor within the log.
func (s *Snapshot) patchedFrom(since uint64) bool {
	_, found := slices.BinarySearchFunc(s.steps, since, func(st step, t uint64) int { return cmp.Compare(st.from, t) })
	return found
}

// ChangedSince returns the addresses whose flows may have another verdict in s than in the
// snapshot with serial since, and false when s cannot tell (since is no ancestor within its
// last patches, or a full compile came between): then every verdict of since is suspect.
func (s *Snapshot) ChangedSince(since uint64) ([]netip.Addr, bool) {
	if since == s.serial {
		return nil, true
	}
	if !s.patchedFrom(since) {
		return nil, false
	}
	var out []netip.Addr
	for a, at := range s.touchedAt {
		if at > since {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, true
}

// touched collects the addresses a patch touches.
type touched map[netip.Addr]struct{}

func (t touched) add(addrs []netip.Addr) {
	for _, a := range addrs {
		t[a] = struct{}{}
	}
}

// record puts a patch from old into s's log: old's log less its oldest patches past the
// bounds, and this patch.
func (t touched) record(s, old *Snapshot) {
	s.steps, s.touchedAt = nil, nil
	if len(t) > maxChangeAddrs {
		return
	}
	steps := append(slices.Clone(old.steps), step{from: old.serial, addrs: len(t)})
	total := 0
	for _, st := range steps {
		total += st.addrs
	}
	for len(steps) > keptChanges || total > maxChangeAddrs {
		total -= steps[0].addrs
		steps = steps[1:]
	}
	// A touch before the window's first snapshot is older than any answer the log can vouch
	// for, so it need not be kept.
	start := steps[0].from
	at := make(map[netip.Addr]uint64, len(t)+len(old.touchedAt))
	for a, v := range old.touchedAt {
		if v > start {
			at[a] = v
		}
	}
	for a := range t {
		at[a] = s.serial
	}
	s.steps, s.touchedAt = slices.Clip(steps), at
}
