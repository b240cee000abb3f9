package filter

import (
	"net/netip"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/sluice-dev/sluice/policy"
)

// Idle timeouts of the return table. They are shorter than conntrack's (5 days for an
// established TCP connection) because the table is bounded and an idle flow that loses its
// entry is judged again by policy on its next packet, which admits it again if it is still
// allowed: a TCP packet that cannot open a connection is accepted when the flow is allowed in
// either direction.
const (
	trackIdleTCP   = time.Hour
	trackIdleSCTP  = time.Hour
	trackIdleOther = 2 * time.Minute // UDP, ICMP and the rest, as conntrack's UDP stream
	// trackRefresh: an entry is rewritten at most this often, which keeps steady-state packets
	// from touching the LRU list on every hit.
	trackRefresh = time.Second
)

// tuple is one direction of a connection as seen in a packet.
type tuple struct {
	Src, Dst         netip.Addr
	Proto            policy.Protocol
	SrcPort, DstPort uint16
}

func (t tuple) reverse() tuple {
	return tuple{Src: t.Dst, Dst: t.Src, Proto: t.Proto, SrcPort: t.DstPort, DstPort: t.SrcPort}
}

func packetTuple(p *Packet) tuple {
	return tuple{Src: p.Flow.Src, Dst: p.Flow.Dst, Proto: p.Flow.Proto, SrcPort: p.SrcPort, DstPort: p.Flow.Port}
}

type trackEntry struct {
	last int64 // unix nanoseconds of the last packet seen
	gen  uint64
	// orig is the flow that was judged when the connection opened; a new snapshot judges it
	// again when established connections are cut.
	orig policy.Flow
}

// returnTable is sluice's own connection table for the modes that cannot rely on kernel
// conntrack state: both directions of every accepted connection, keyed on the full 5-tuple,
// with idle timeouts. One per worker, without a lock: NFQUEUE's --queue-balance hashes the
// sorted address pair (the kernel's nfqueue_hash puts "packets in either direction into the
// same queue"), so both directions of a connection meet the same worker; the queue-all test
// with several queues checks it.
type returnTable struct {
	lru *simplelru.LRU[tuple, trackEntry]
}

// newReturnTable makes a table holding up to size connection directions.
func newReturnTable(size int) *returnTable {
	if size <= 0 {
		size = DefaultCacheSize
	}
	l, err := simplelru.NewLRU[tuple, trackEntry](size, nil)
	if err != nil {
		panic(err)
	}
	return &returnTable{lru: l}
}

func idleFor(p policy.Protocol) int64 {
	switch p {
	case policy.TCP:
		return int64(trackIdleTCP)
	case policy.SCTP:
		return int64(trackIdleSCTP)
	}
	return int64(trackIdleOther)
}

// Lookup finds the connection the packet belongs to. An expired entry is removed and not
// returned. A hit refreshes both directions (at most once per trackRefresh).
func (t *returnTable) Lookup(k tuple, now int64) (trackEntry, bool) {
	e, ok := t.lru.Peek(k)
	if !ok {
		return e, false
	}
	if now-e.last > idleFor(k.Proto) {
		t.lru.Remove(k)
		t.lru.Remove(k.reverse())
		return e, false
	}
	if now-e.last >= int64(trackRefresh) {
		e.last = now
		t.lru.Add(k, e)
		t.lru.Add(k.reverse(), e)
	}
	return e, true
}

// Record remembers an accepted connection in both directions; k is the packet's own tuple and
// orig the flow that was judged to accept it.
func (t *returnTable) Record(k tuple, orig policy.Flow, gen uint64, now int64) {
	if e, ok := t.lru.Peek(k); ok && e.gen == gen && now-e.last < int64(trackRefresh) {
		return
	}
	e := trackEntry{last: now, gen: gen, orig: orig}
	t.lru.Add(k, e)
	t.lru.Add(k.reverse(), e)
}

// Restamp marks an entry as re-judged under a new snapshot generation.
func (t *returnTable) Restamp(k tuple, e trackEntry, gen uint64) {
	e.gen = gen
	t.lru.Add(k, e)
	t.lru.Add(k.reverse(), e)
}

// Forget removes both directions of a connection.
func (t *returnTable) Forget(k tuple) {
	t.lru.Remove(k)
	t.lru.Remove(k.reverse())
}

// Len is the number of directions held.
func (t *returnTable) Len() int { return t.lru.Len() }
