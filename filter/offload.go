package filter

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/policy"
)

// OffloadSets names the kernel sets that hold offloaded verdicts. Each is an ipset of type
// hash:ip,port,ip keyed (source IP, protocol:destination port, destination IP) — exactly the flow
// cache key — so an iptables rule `-m set --match-set NAME src,dst,dst` placed before the NFQUEUE
// rule accepts (Allow*) or drops (Deny*) repeat flows in the kernel. An empty name means the set
// does not exist and no rule should reference it.
type OffloadSets struct {
	Allow4, Deny4, Allow6, Deny6 string
}

// OffloadStats counts what the offloader did since it started.
type OffloadStats struct {
	Recorded uint64 // Record calls that were queued for the kernel
	Dropped  uint64 // Record calls lost because the queue was full (the flow simply stays in user space)
	Skipped  uint64 // Record calls for protocols the sets cannot key on (not TCP/UDP/SCTP)
	Stale    uint64 // queued entries discarded because a Flush happened after their decision
	Added    uint64 // entries written to the kernel
	Errors   uint64 // kernel writes that failed
	Flushes  uint64
}

// offloadQueueLen bounds the memory and the lag between a decision and its kernel entry. When
// the writer falls behind, further flows stay in user space until it catches up, which costs
// speed but never correctness.
const offloadQueueLen = 4096

// offloadBatch is how many entries the writer takes per wake-up before it lets Flush in.
const offloadBatch = 256

type offloadItem struct {
	src, dst netip.Addr
	gen      uint64
	port     uint16
	proto    policy.Protocol
	allowed  bool
}

// Offload mirrors decided flows into kernel sets so that later connections between the same
// endpoints never leave the kernel. The packet path calls Record (non-blocking, no allocation);
// one background goroutine writes the entries over netlink. Flush empties every set when the
// policy snapshot changes.
//
// Order of teardown: remove the iptables rules that reference Sets() first, then Close, which
// destroys the sets (the kernel refuses to destroy a set a rule still uses).
type Offload struct {
	h       *netlink.Handle // bound to the network namespace NewOffload ran in
	sets    OffloadSets
	timeout uint32
	log     *slog.Logger

	q    chan offloadItem
	done chan struct{}
	wg   sync.WaitGroup

	// mu orders kernel writes against Flush: an entry decided under generation g is written
	// only while no Flush to a later generation has happened, so none survives a policy change.
	mu  sync.Mutex
	gen atomic.Uint64

	closeOnce sync.Once
	// refl is the follow-up flush Flush schedules; closed stops it from touching the sets once
	// Close has destroyed them. Both under mu.
	refl   *time.Timer
	closed bool
	grace  time.Duration

	recorded, dropped, skipped, stale, added, errs, flushes atomic.Uint64
}

// NewOffload creates (or reuses and empties) the four sets PREFIX-allow4, PREFIX-deny4,
// PREFIX-allow6 and PREFIX-deny6 in the network namespace of the calling thread, with entries
// expiring after timeout (rounded to whole seconds, at least 1 s), and starts the writer.
// prefix must be short: ipset names are limited to 31 bytes.
func NewOffload(prefix string, timeout time.Duration, log *slog.Logger) (*Offload, error) {
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
		sets: OffloadSets{
			Allow4: prefix + "-allow4", Deny4: prefix + "-deny4",
			Allow6: prefix + "-allow6", Deny6: prefix + "-deny6",
		},
		timeout: secs,
		log:     log,
		q:       make(chan offloadItem, offloadQueueLen),
		done:    make(chan struct{}),
		grace:   flushGrace,
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
func (o *Offload) Sets() *OffloadSets {
	s := o.sets
	return &s
}

// Record queues a decided flow for the kernel under the current generation. It never blocks and
// never allocates: when the queue is full the flow is counted as dropped and stays in user
// space. Call it for every verdict given to a queued packet (cache hit or miss): a packet that
// reached the queue proves the kernel does not hold its flow (yet, or any more).
func (o *Offload) Record(f policy.Flow, allowed bool) {
	o.RecordGen(o.gen.Load(), f, allowed)
}

// RecordGen is Record for a verdict taken under snapshot generation gen. Pair it with FlushGen:
// a verdict from a generation older than the last flush is discarded, which closes the window
// where a packet decided under the old snapshot is recorded just after the flush.
func (o *Offload) RecordGen(gen uint64, f policy.Flow, allowed bool) {
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
	case o.q <- offloadItem{src: f.Src, dst: f.Dst, gen: gen, port: f.Port, proto: f.Proto, allowed: allowed}:
		o.recorded.Add(1)
	default:
		o.dropped.Add(1)
	}
}

// flushGrace is how long after Flush a second flush follows. Record carries no generation,
// so a packet judged by the old snapshot whose Record call lands just after Flush (its worker
// was between Decide and Record during the swap) could write a stale entry; the second flush
// bounds that entry's life to flushGrace. The price is that flows recorded within the grace
// period make one more trip through the queue.
const flushGrace = 250 * time.Millisecond

// Flush empties every set. Call it after each snapshot swap so no verdict of the old policies
// survives; entries recorded before the call and still queued are discarded too, and a second
// flush follows after flushGrace (see there). A failure is logged (the packet path has nobody
// to return it to); FlushGen returns it. Callers that know the snapshot generation use
// RecordGen/FlushGen instead, which close the window exactly.
func (o *Offload) Flush() {
	if err := o.FlushGen(o.gen.Load() + 1); err != nil {
		o.log.Error("offload: flushing the kernel sets failed; stale verdicts may survive until their timeout", "err", err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return
	}
	if o.refl == nil {
		o.refl = time.AfterFunc(o.grace, func() {
			if err := o.flushIfOpen(); err != nil {
				o.log.Error("offload: second flush of the kernel sets failed", "err", err)
			}
		})
	} else {
		o.refl.Reset(o.grace)
	}
}

func (o *Offload) flushIfOpen() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	return o.flushLocked()
}

// FlushGen empties every set and discards queued verdicts of generations older than gen (the
// generation of the snapshot now in force). Generations only move forward.
func (o *Offload) FlushGen(gen uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if gen > o.gen.Load() {
		o.gen.Store(gen)
	}
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
	return errors.Join(errs...)
}

// Stats returns the counters.
func (o *Offload) Stats() OffloadStats {
	return OffloadStats{
		Recorded: o.recorded.Load(), Dropped: o.dropped.Load(), Skipped: o.skipped.Load(),
		Stale: o.stale.Load(), Added: o.added.Load(), Errors: o.errs.Load(), Flushes: o.flushes.Load(),
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
		if o.refl != nil {
			o.refl.Stop()
		}
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
	// One entry value reused for every write: the netlink encoder copies it into the message.
	var (
		e     netlink.IPSetEntry
		port  uint16
		proto uint8
		ip1   = make(net.IP, 16)
		ip2   = make(net.IP, 16)
	)
	e.Port, e.Protocol, e.Replace = &port, &proto, true
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
		cur := o.gen.Load()
		for i := range batch {
			it := &batch[i]
			if it.gen < cur {
				o.stale.Add(1)
				continue
			}
			var set string
			if it.src.Is4() {
				a, b := it.src.As4(), it.dst.As4()
				e.IP, e.IP2 = append(ip1[:0], a[:]...), append(ip2[:0], b[:]...)
				set = o.sets.Deny4
				if it.allowed {
					set = o.sets.Allow4
				}
			} else {
				a, b := it.src.As16(), it.dst.As16()
				e.IP, e.IP2 = append(ip1[:0], a[:]...), append(ip2[:0], b[:]...)
				set = o.sets.Deny6
				if it.allowed {
					set = o.sets.Allow6
				}
			}
			port, proto = it.port, uint8(it.proto)
			if err := o.h.IpsetAdd(set, &e); err != nil {
				if n := o.errs.Add(1); n == 1 || n%1000 == 0 {
					o.log.Warn("offload: adding an entry to the kernel set failed; the flow stays in user space",
						"set", set, "src", it.src, "dst", it.dst, "proto", it.proto, "port", it.port, "err", err, "failures", n)
				}
				continue
			}
			o.added.Add(1)
		}
		o.mu.Unlock()
	}
}
