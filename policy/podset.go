package policy

import (
	"math/bits"
	"slices"
)

// podSet is a set of pod indexes resolved from one peer selector. Small sets are sorted lists
// (binary search); sets holding more than 1/32 of the pods are bitsets, so memory stays at
// most twice the smaller of the two forms.
type podSet struct {
	list []podID
	bits []uint64
}

func newPodSet(members []podID, universe int) podSet {
	if len(members)*32 <= universe {
		l := slices.Clone(members)
		slices.Sort(l)
		return podSet{list: l}
	}
	b := make([]uint64, (universe+63)/64)
	for _, m := range members {
		b[m>>6] |= 1 << (uint(m) & 63)
	}
	return podSet{bits: b}
}

func (p *podSet) contains(i podID) bool {
	if p.bits != nil {
		w := int(i >> 6)
		return w < len(p.bits) && p.bits[w]&(1<<(uint(i)&63)) != 0
	}
	_, ok := slices.BinarySearch(p.list, i)
	return ok
}

func (p *podSet) len() int {
	if p.bits == nil {
		return len(p.list)
	}
	n := 0
	for _, w := range p.bits {
		n += bits.OnesCount64(w)
	}
	return n
}
