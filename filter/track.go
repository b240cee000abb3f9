package filter

import (
	"hash/maphash"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/sluice-dev/sluice/policy"
)

// Idle timeouts of the return table. They are shorter than conntrack's (5 days for an
// established TCP connection) because the table is bounded; a connection that loses its entry
// keeps working in the default mode (conntrack carries it) and only loses the ability to
// resume after a conntrack flush.
const (
	trackIdleTCP   = time.Hour
	trackIdleSCTP  = time.Hour
	trackIdleOther = 2 * time.Minute // UDP, ICMP and the rest, as conntrack's UDP stream
	// trackIdleClosing applies once a FIN was seen: the connection is ending, and a busy client
	// closing thousands of them must not keep them against its quota for an hour.
	trackIdleClosing = 10 * time.Second
)

// bucketSize is how many connections share a hash bucket. A connection lives only in its own
// bucket, so a lookup reads at most this many entries and an insert into a full bucket evicts
// one of them (see record); the hash is seeded per table, so a pod cannot aim its flows at
// another pod's bucket.
const bucketSize = 8

// ownerSlots is the number of per-opener counters behind the quota. Openers share a counter
// when their addresses hash alike, which only makes their quotas shared.
const ownerSlots = 4096

// connKey is one connection, both directions: the two ends in a fixed order.
type connKey struct {
	a, b   [16]byte
	pa, pb uint16
	proto  policy.Protocol
	v4     bool
}

// conn is one connection sluice accepted as an opening. It is plain data: the table holds no
// pointers for the garbage collector to follow.
type conn struct {
	key   connKey
	last  int64  // unix nanoseconds of the last packet seen
	gen   uint64 // snapshot generation that last judged it
	owner uint16 // the opener's quota slot
	// origAB: the opening went from a to b. replied: a packet of the other direction was seen,
	// so the connection works both ways; such entries are evicted last. closing: a FIN was
	// seen.
	origAB, replied, closing, used bool
}

// returnTable is sluice's own connection table: every connection accepted as an opening, keyed
// on the full 5-tuple (the ICMP query identifier standing in for ports), with idle timeouts. It
// is what lets a packet that cannot open a connection through: only when it belongs to one of
// these. One per worker, without a lock: NFQUEUE's --queue-balance hashes the sorted address
// pair (the kernel's nfqueue_hash puts "packets in either direction into the same queue"), so
// both directions of a connection meet the same worker.
//
// It is a fixed array of small buckets rather than an LRU list, so that recording a connection
// allocates nothing, and so that eviction can protect the flows of others: no opener may hold
// more than quota entries (its own oldest goes first), and when a bucket is full the victim is
// an expired entry, else one never replied to, else the oldest.
type returnTable struct {
	seed    maphash.Seed
	buckets [][bucketSize]conn
	mask    uint64
	quota   int32
	owners  [ownerSlots]int32
	stats   trackStats
}

// trackStats are atomics only so that a scrape may read them; one worker writes them.
type trackStats struct {
	evicted   atomic.Uint64 // live entries pushed out by another
	overQuota atomic.Uint64 // openings not recorded: their opener held its quota and none of its own entries could make room
}

// newReturnTable makes a table holding about size connections.
func newReturnTable(size int) *returnTable {
	if size <= 0 {
		size = DefaultCacheSize
	}
	n := 1
	for n*bucketSize < size {
		n <<= 1
	}
	t := &returnTable{seed: maphash.MakeSeed(), buckets: make([][bucketSize]conn, n), mask: uint64(n - 1)}
	// One opener may hold a sixteenth of the table: a busy client keeps thousands of
	// connections, and sixteen floods at once still leave room for everyone else.
	t.quota = int32(max(n*bucketSize/16, 64))
	return t
}

// expired reports whether the entry has been idle past its timeout at now.
func (e *conn) expired(now int64) bool { return now-e.last > e.idle() }

func (e *conn) idle() int64 {
	if e.closing {
		return int64(trackIdleClosing)
	}
	return idleFor(e.key.proto)
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

// keyOf is the packet's connection and whether the packet goes from a to b.
func keyOf(p *Packet) (connKey, bool) {
	sport, dport := p.SrcPort, p.Flow.Port
	if p.Kind == KindQuery || p.Kind == KindQueryReply {
		sport, dport = p.ID, p.ID
	}
	src, dst := p.Flow.Src.As16(), p.Flow.Dst.As16()
	k := connKey{proto: p.Flow.Proto, v4: p.Flow.Src.Is4()}
	if less(src, sport, dst, dport) {
		k.a, k.pa, k.b, k.pb = src, sport, dst, dport
		return k, true
	}
	k.a, k.pa, k.b, k.pb = dst, dport, src, sport
	return k, false
}

func less(x [16]byte, xp uint16, y [16]byte, yp uint16) bool {
	for i := range x {
		if x[i] != y[i] {
			return x[i] < y[i]
		}
	}
	return xp < yp
}

func (t *returnTable) bucket(k *connKey) *[bucketSize]conn {
	return &t.buckets[maphash.Comparable(t.seed, *k)&t.mask]
}

func (t *returnTable) ownerSlot(src netip.Addr) uint16 {
	return uint16(maphash.Comparable(t.seed, src.As16()) % ownerSlots)
}

// lookup finds the connection the packet belongs to; reply says the packet goes the other way
// than the opening did. An expired entry is removed and not returned. A hit refreshes it.
func (t *returnTable) lookup(p *Packet, now int64) (c *conn, reply bool) {
	k, ab := keyOf(p)
	b := t.bucket(&k)
	for i := range b {
		e := &b[i]
		if !e.used || e.key != k {
			continue
		}
		if e.expired(now) {
			t.remove(e)
			return nil, false
		}
		e.last = now
		reply = ab != e.origAB
		if reply {
			e.replied = true
		}
		return e, reply
	}
	return nil, false
}

// record remembers a connection the packet opened, judged under generation gen. It reports
// false when the opener is over its quota and none of its own entries could make room.
func (t *returnTable) record(p *Packet, gen uint64, now int64) bool {
	k, ab := keyOf(p)
	b := t.bucket(&k)
	for i := range b {
		if e := &b[i]; e.used && e.key == k { // a retransmitted opening, or the flow opened again
			e.last, e.gen, e.origAB = now, gen, ab
			return true
		}
	}
	owner := t.ownerSlot(p.Flow.Src)
	var victim *conn
	if t.owners[owner] >= t.quota {
		// Over quota: only the opener's own entries may make room, its oldest first.
		for i := range b {
			if e := &b[i]; e.used && e.owner == owner && (victim == nil || e.last < victim.last) {
				victim = e
			}
		}
		if victim != nil && !victim.expired(now) {
			// Its own entry goes, so the opener stays at its quota.
			t.stats.evicted.Add(1)
		}
		if victim == nil {
			t.stats.overQuota.Add(1)
			return false
		}
	} else {
		for i := range b {
			e := &b[i]
			if !e.used || e.expired(now) {
				victim = e
				break
			}
			if victim == nil || victimRank(e) < victimRank(victim) {
				victim = e
			}
		}
	}
	if victim.used {
		if !victim.expired(now) && victim.owner != owner {
			t.stats.evicted.Add(1)
		}
		t.owners[victim.owner]--
	}
	*victim = conn{key: k, last: now, gen: gen, owner: owner, origAB: ab, used: true}
	t.owners[owner]++
	return true
}

// ended tells the table what a TCP packet of a tracked connection says about its end: after a
// RST the connection is gone (the entry too, once the RST has passed), after a FIN it has
// trackIdleClosing left.
func (t *returnTable) ended(e *conn, tcpFlags uint8) {
	switch {
	case tcpFlags&tcpRST != 0:
		t.remove(e)
	case tcpFlags&tcpFIN != 0:
		e.closing = true
	}
}

// victimRank orders live entries for eviction: never-replied ones before replied ones, older
// before newer.
func victimRank(e *conn) int64 {
	if e.replied {
		return e.last + 1<<62
	}
	return e.last
}

func (t *returnTable) remove(e *conn) {
	if e.used {
		t.owners[e.owner]--
	}
	*e = conn{}
}

// opening is the flow that opened the connection, as policy judged it.
func (e *conn) opening() policy.Flow {
	src, dst, port := e.key.a, e.key.b, e.key.pb
	if !e.origAB {
		src, dst, port = e.key.b, e.key.a, e.key.pa
	}
	f := policy.Flow{Src: addrOf(src, e.key.v4), Dst: addrOf(dst, e.key.v4), Proto: e.key.proto, Port: port}
	if f.Proto == 1 || f.Proto == 58 { // ICMP is judged without a port; the identifier was one
		f.Port = 0
	}
	return f
}

func addrOf(b [16]byte, v4 bool) netip.Addr {
	a := netip.AddrFrom16(b)
	if v4 {
		return a.Unmap()
	}
	return a
}

// len counts the connections held (expired ones included).
func (t *returnTable) len() int {
	n := 0
	for i := range t.buckets {
		for j := range t.buckets[i] {
			if t.buckets[i][j].used {
				n++
			}
		}
	}
	return n
}
