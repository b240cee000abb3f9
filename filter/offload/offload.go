// Package offload mirrors decided flows into kernel ipsets (hash:ip,port,ip: source IP,
// protocol:destination port, destination IP, with a timeout) that iptables rules match before the
// NFQUEUE rule, so repeat connections between the same endpoints are decided in the kernel.
//
// When a new snapshot comes, only the entries with an end whose verdicts it may have changed
// are deleted (policy.Snapshot.ChangedSince); the sets are flushed only when the snapshot cannot
// tell (a full compile). So a cluster that changes pods every second keeps its offload.
package offload

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/policy"
)

// Sets names the kernel sets that hold offloaded verdicts. Each is an ipset of type
// hash:ip,port,ip keyed (source IP, protocol:destination port, destination IP) — exactly the flow
// cache key — so an iptables rule `-m set --match-set NAME src,dst,dst` placed before the NFQUEUE
// rule accepts (Allow*) or drops (Deny*) repeat flows in the kernel. An empty name means the set
// does not exist and no rule should reference it.
type Sets struct {
	Allow4, Deny4, Allow6, Deny6 string
}

// stats counts what the offloader did since it started; it is exported as metrics.
type stats struct {
	Recorded uint64 // Record calls that were queued for the kernel
	Dropped  uint64 // Record calls lost because the queue was full (the flow simply stays in user space)
	Skipped  uint64 // Record calls for protocols the sets cannot key on (not TCP/UDP/SCTP)
	Stale    uint64 // queued entries discarded because a newer snapshot changed their verdict
	Added    uint64 // entries written to the kernel
	Errors   uint64 // kernel writes that failed
	Flushes  uint64
	Deleted  uint64 // entries deleted from the kernel because a new snapshot touched an end
}

// offloadQueueLen bounds the memory and the lag between a decision and its kernel entry. When
// the writer falls behind, further flows stay in user space until it catches up, which costs
// speed but never correctness.
const offloadQueueLen = 4096

// offloadBatch is how many entries the writer takes per wake-up before it lets Flush in.
const offloadBatch = 256

type offloadItem struct {
	f       policy.Flow
	serial  uint64 // of the snapshot that decided it
	allowed bool
}

// maxWritten bounds the entries the offloader remembers writing, and so the kernel entries it
// can delete one by one (each is listed under both its ends). At the bound, further flows stay
// in user space until entries expire. The sets' default size is 65536 entries.
const maxWritten = 2 * 65536

// maxDeletes: a new snapshot whose changed addresses hold more entries than this empties the
// sets instead; one flush is cheaper than that many deletes.
const maxDeletes = 4096

// expiryMargin is how many seconds past its timeout the offloader still deletes an entry.
const expiryMargin = 2

// written is an entry the offloader put in the kernel, until it expires there.
type written struct {
	f       policy.Flow
	allowed bool
	expires int64 // unix nanoseconds
}

// Offload mirrors decided flows into kernel sets so that later connections between the same
// endpoints never leave the kernel. The packet path calls RecordGen (non-blocking, no
// allocation); one background goroutine writes the entries over netlink. FlushGen empties every
// set when the policy snapshot changes. Offload is a prometheus.Collector of its counters.
//
// Order of teardown: remove the iptables rules that reference Sets() first, then Close, which
// destroys the sets (the kernel refuses to destroy a set a rule still uses).
type Offload struct {
	h       *netlink.Handle // bound to the network namespace New ran in
	sets    Sets
	timeout uint32
	log     *slog.Logger

	q    chan offloadItem
	done chan struct{}
	wg   sync.WaitGroup

	// mu orders kernel writes against Publish: an entry is written only while the snapshot in
	// force vouches for its verdict, and every entry written is in byAddr, so none survives a
	// policy change that touches its flow.
	mu      sync.Mutex
	cur     *policy.Snapshot // the snapshot in force; nil before the first and after Forget
	byAddr  map[netip.Addr][]written
	nw      int   // entries listed in byAddr
	sweepAt int64 // when expired entries are next dropped from byAddr
	swept   int64 // when they last were

	closeOnce sync.Once
	closed    bool // under mu: the sets are gone

	recorded, dropped, skipped, stale, added, errs, flushes, deleted atomic.Uint64
}

// New creates (or reuses and empties) the four sets PREFIX-allow4, PREFIX-deny4,
// PREFIX-allow6 and PREFIX-deny6 in the network namespace of the calling thread, with entries
// expiring after timeout (rounded to whole seconds, at least 1 s), and starts the writer.
// prefix must be short: ipset names are limited to 31 bytes.
func New(prefix string, timeout time.Duration, log *slog.Logger) (*Offload, error) {
	if log == nil {
		log = slog.Default()
	}
	if len(prefix)+len("-allow4") > 31 {
		return nil, fmt.Errorf("offload: set prefix %q is too long: ipset names are limited to 31 bytes, use at most 24", prefix)
	}
	secs := uint32(timeout / time.Second)
	if secs == 0 {
		secs = 1
	}
	// A handle with its own socket keeps every later call in this namespace, whichever OS
	// thread the writer goroutine happens to run on.
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("offload: open netfilter netlink socket: %w (run as root with CAP_NET_ADMIN)", err)
	}
	o := &Offload{
		h: h,
		sets: Sets{
			Allow4: prefix + "-allow4", Deny4: prefix + "-deny4",
			Allow6: prefix + "-allow6", Deny6: prefix + "-deny6",
		},
		timeout: secs,
		log:     log,
		q:       make(chan offloadItem, offloadQueueLen),
		done:    make(chan struct{}),
		byAddr:  make(map[netip.Addr][]written),
	}
	for _, s := range []struct {
		name   string
		family uint8
	}{{o.sets.Allow4, unix.AF_INET}, {o.sets.Deny4, unix.AF_INET}, {o.sets.Allow6, unix.AF_INET6}, {o.sets.Deny6, unix.AF_INET6}} {
		t := secs
		// Replace drops the exclusive flag: a set left by a crashed agent with the same type is
		// reused (and flushed below) instead of failing the start.
		err := h.IpsetCreate(s.name, "hash:ip,port,ip", netlink.IpsetCreateOptions{
			Replace: true, Timeout: &t, Family: s.family,
		})
		if err != nil {
			o.destroySets()
			h.Close()
			return nil, fmt.Errorf("offload: create ipset %s (hash:ip,port,ip, timeout %d): %w; is the ip_set_hash_ipportip module available? an existing set of another type with that name must be destroyed first (ipset destroy %s)", s.name, secs, err, s.name)
		}
		if err := h.IpsetFlush(s.name); err != nil {
			o.destroySets()
			h.Close()
			return nil, fmt.Errorf("offload: flush ipset %s: %w", s.name, err)
		}
	}
	o.wg.Add(1)
	go o.writer()
	log.Info("verdict offload ready", "allow4", o.sets.Allow4, "deny4", o.sets.Deny4,
		"allow6", o.sets.Allow6, "deny6", o.sets.Deny6, "timeout", time.Duration(secs)*time.Second)
	return o, nil
}

// Sets names the kernel sets for the rules to match.
func (o *Offload) Sets() *Sets {
	s := o.sets
	return &s
}

// Record queues a flow decided by the snapshot with serial serial for the kernel. It never
// blocks and never allocates: when the queue is full the flow is counted as dropped and stays in
// user space. Call it for every verdict given to a queued packet (cache hit or miss): a packet
// that reached the queue proves the kernel does not hold its flow (yet, or any more). A verdict
// the snapshot in force by the time it is written does not vouch for is discarded, which closes
// the window where a packet decided under the old snapshot is recorded just after a change.
func (o *Offload) Record(serial uint64, f policy.Flow, allowed bool) {
	switch f.Proto {
	case policy.TCP, policy.UDP, policy.SCTP:
	default:
		// hash:ip,port,ip keys ICMP on type/code, not on a port; such flows stay in user space.
		o.skipped.Add(1)
		return
	}
	if !f.Src.IsValid() || !f.Dst.IsValid() || f.Src.Is4() != f.Dst.Is4() || f.Src.Is4In6() || f.Dst.Is4In6() {
		o.skipped.Add(1)
		return
	}
	select {
	case o.q <- offloadItem{f: f, serial: serial, allowed: allowed}:
		o.recorded.Add(1)
	default:
		o.dropped.Add(1)
	}
}

// Publish puts s in force: the entries of flows whose verdict s may have changed since the
// snapshot in force before are deleted from the kernel, or every set is emptied when s cannot
// tell which (the first snapshot, a full compile). Snapshots must come in the order they were
// built. On an error, verdicts of the old snapshot may survive in the kernel: call Flush until
// it succeeds.
func (o *Offload) Publish(s *policy.Snapshot) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return errors.New("offload: publish after Close")
	}
	prev := o.cur
	o.cur = s
	if prev != nil {
		if addrs, ok := s.ChangedSince(prev.Serial()); ok {
			return o.deleteLocked(addrs)
		}
	}
	return o.flushLocked()
}

// Flush empties every set.
func (o *Offload) Flush() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return errors.New("offload: flush after Close")
	}
	return o.flushLocked()
}

// Forget empties every set and discards every verdict still queued, for an agent that stops
// and leaves the rules behind: nobody would delete its entries on the next policy change.
func (o *Offload) Forget() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.cur = nil
	if o.closed {
		return errors.New("offload: flush after Close")
	}
	return o.flushLocked()
}

func (o *Offload) flushLocked() error {
	var errs []error
	for _, s := range []string{o.sets.Allow4, o.sets.Deny4, o.sets.Allow6, o.sets.Deny6} {
		if err := o.h.IpsetFlush(s); err != nil {
			errs = append(errs, fmt.Errorf("offload: flush ipset %s: %w", s, err))
		}
	}
	o.flushes.Add(1)
	clear(o.byAddr)
	o.nw = 0
	return errors.Join(errs...)
}

// deleteLocked deletes from the kernel the entries with an end in addrs, or flushes when they
// are too many or a delete fails.
func (o *Offload) deleteLocked(addrs []netip.Addr) error {
	now := time.Now().UnixNano()
	n := 0
	for _, a := range addrs {
		n += len(o.byAddr[a])
	}
	if n > maxDeletes {
		return o.flushLocked()
	}
	var k kernelEntry
	for _, a := range addrs {
		for _, w := range o.byAddr[a] {
			if w.expires <= now {
				continue
			}
			set := k.set(o.sets, w.f, w.allowed)
			k.e.Replace = false // without it a missing entry is an error, so Deleted counts real ones
			err := o.h.IpsetDel(set, &k.e)
			if err != nil && !gone(err) {
				o.log.Warn("offload: deleting an entry a policy change touched failed; emptying the sets instead",
					"set", set, "src", w.f.Src, "dst", w.f.Dst, "proto", w.f.Proto, "port", w.f.Port, "err", err)
				return o.flushLocked()
			}
			if err == nil {
				o.deleted.Add(1)
			}
		}
		// The entry stays listed under its other end until it expires; deleting it twice is
		// harmless.
		o.nw -= len(o.byAddr[a])
		delete(o.byAddr, a)
	}
	return nil
}

// gone reports whether a delete failed only because the entry was not there (it expired).
func gone(err error) bool {
	return errors.Is(err, unix.ENOENT) || err == nl.IPSetError(nl.IPSET_ERR_EXIST)
}

// kernelEntry is one netlink entry value reused for every write: the encoder copies it into the
// message.
type kernelEntry struct {
	e        netlink.IPSetEntry
	port     uint16
	proto    uint8
	ip1, ip2 [16]byte
}

// set fills the entry for flow f and returns the set it belongs in.
func (k *kernelEntry) set(sets Sets, f policy.Flow, allowed bool) string {
	k.e.Port, k.e.Protocol = &k.port, &k.proto
	k.port, k.proto = f.Port, uint8(f.Proto)
	if f.Src.Is4() {
		a, b := f.Src.As4(), f.Dst.As4()
		k.e.IP, k.e.IP2 = append(k.ip1[:0], a[:]...), append(k.ip2[:0], b[:]...)
		if allowed {
			return sets.Allow4
		}
		return sets.Deny4
	}
	k.ip1, k.ip2 = f.Src.As16(), f.Dst.As16()
	k.e.IP, k.e.IP2 = k.ip1[:], k.ip2[:]
	if allowed {
		return sets.Allow6
	}
	return sets.Deny6
}

func (o *Offload) stats() stats {
	return stats{
		Recorded: o.recorded.Load(), Dropped: o.dropped.Load(), Skipped: o.skipped.Load(),
		Stale: o.stale.Load(), Added: o.added.Load(), Errors: o.errs.Load(), Flushes: o.flushes.Load(),
		Deleted: o.deleted.Load(),
	}
}

// Close stops the writer and destroys the sets. Remove the rules that reference the sets before
// calling it; otherwise the kernel keeps the sets (busy) and Close says so.
func (o *Offload) Close() error {
	var err error
	o.closeOnce.Do(func() {
		close(o.done)
		o.wg.Wait()
		o.mu.Lock()
		o.closed = true
		o.mu.Unlock()
		err = o.destroySets()
		o.h.Close()
	})
	return err
}

func (o *Offload) destroySets() error {
	var errs []error
	for _, s := range []string{o.sets.Allow4, o.sets.Deny4, o.sets.Allow6, o.sets.Deny6} {
		err := o.h.IpsetDestroy(s)
		if err == nil || errors.Is(err, unix.ENOENT) || err == nl.IPSetError(nl.IPSET_ERR_EXIST) {
			continue
		}
		if errors.Is(err, unix.EBUSY) || err == nl.IPSetError(nl.IPSET_ERR_BUSY) {
			errs = append(errs, fmt.Errorf("offload: ipset %s is still referenced by a rule: remove the rules before Close", s))
			continue
		}
		errs = append(errs, fmt.Errorf("offload: destroy ipset %s: %w", s, err))
	}
	return errors.Join(errs...)
}

func (o *Offload) writer() {
	defer o.wg.Done()
	batch := make([]offloadItem, 0, offloadBatch)
	var k kernelEntry
	for {
		var first offloadItem
		select {
		case <-o.done:
			return
		case first = <-o.q:
		}
		batch = append(batch[:0], first)
	drain:
		for len(batch) < offloadBatch {
			select {
			case it := <-o.q:
				batch = append(batch, it)
			default:
				break drain
			}
		}
		o.mu.Lock()
		o.write(batch, &k)
		o.mu.Unlock()
	}
}

// write puts the batch's entries the snapshot in force vouches for in the kernel, under mu.
func (o *Offload) write(batch []offloadItem, k *kernelEntry) {
	now := time.Now().UnixNano()
	if now >= o.sweepAt || (o.nw >= maxWritten && now-o.swept >= int64(time.Second)) {
		o.sweep(now)
	}
	// The kernel counts an entry's timeout from its add, which comes after now, in whole
	// seconds: the margin keeps the offloader from taking an entry for expired (and so
	// skipping its delete) while the kernel still holds it.
	expires := now + (int64(o.timeout)+expiryMargin)*int64(time.Second)
	for i := range batch {
		it := &batch[i]
		if o.cur == nil || !o.cur.Unchanged(it.f, it.serial) {
			o.stale.Add(1)
			continue
		}
		if o.nw >= maxWritten {
			o.dropped.Add(1) // it could not be deleted on a change: it stays in user space
			continue
		}
		set := k.set(o.sets, it.f, it.allowed)
		k.e.Replace = true // an entry already there (a packet queued before it landed) is refreshed
		if err := o.h.IpsetAdd(set, &k.e); err != nil {
			if n := o.errs.Add(1); n == 1 || n%1000 == 0 {
				o.log.Warn("offload: adding an entry to the kernel set failed; the flow stays in user space",
					"set", set, "src", it.f.Src, "dst", it.f.Dst, "proto", it.f.Proto, "port", it.f.Port, "err", err, "failures", n)
			}
			continue
		}
		w := written{f: it.f, allowed: it.allowed, expires: expires}
		o.byAddr[it.f.Src] = append(o.byAddr[it.f.Src], w)
		o.byAddr[it.f.Dst] = append(o.byAddr[it.f.Dst], w)
		o.nw += 2
		o.added.Add(1)
	}
}

// sweep drops the entries that have expired in the kernel: once per timeout, and at most once a
// second while the bound is reached.
func (o *Offload) sweep(now int64) {
	o.sweepAt, o.swept = now+int64(o.timeout)*int64(time.Second), now
	for a, l := range o.byAddr {
		live := slices.DeleteFunc(l, func(w written) bool { return w.expires <= now })
		o.nw -= len(l) - len(live)
		if len(live) == 0 {
			delete(o.byAddr, a)
		} else {
			o.byAddr[a] = live
		}
	}
}

var (
	descRecorded = prometheus.NewDesc("sluice_offload_recorded_total", "Verdicts queued for the kernel offload sets.", nil, nil)
	descDropped  = prometheus.NewDesc("sluice_offload_queue_dropped_total", "Verdicts not offloaded because the writer's queue was full (their flows stay in user space).", nil, nil)
	descSkipped  = prometheus.NewDesc("sluice_offload_skipped_total", "Verdicts the sets cannot key on (not TCP, UDP or SCTP).", nil, nil)
	descStale    = prometheus.NewDesc("sluice_offload_stale_total", "Queued verdicts discarded because a newer snapshot was put in force first.", nil, nil)
	descAdded    = prometheus.NewDesc("sluice_offload_added_total", "Entries written to the kernel offload sets.", nil, nil)
	descErrors   = prometheus.NewDesc("sluice_offload_write_errors_total", "Kernel writes to the offload sets that failed.", nil, nil)
	descFlushes  = prometheus.NewDesc("sluice_offload_flushes_total", "Flushes of the offload sets (a snapshot that cannot tell which verdicts it changed: the first, a full compile).", nil, nil)
	descDeleted  = prometheus.NewDesc("sluice_offload_deleted_total", "Entries deleted from the offload sets because a new snapshot touched one of their ends.", nil, nil)
)

// Describe implements prometheus.Collector.
func (o *Offload) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRecorded, descDropped, descSkipped, descStale, descAdded, descErrors, descFlushes, descDeleted} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (o *Offload) Collect(ch chan<- prometheus.Metric) {
	st := o.stats()
	for _, m := range []struct {
		d *prometheus.Desc
		v uint64
	}{{descRecorded, st.Recorded}, {descDropped, st.Dropped}, {descSkipped, st.Skipped}, {descStale, st.Stale},
		{descAdded, st.Added}, {descErrors, st.Errors}, {descFlushes, st.Flushes}, {descDeleted, st.Deleted}} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v))
	}
}
