// Package offload mirrors decided flows into kernel ipsets (hash:ip,port,ip: source IP,
// protocol:destination port, destination IP, with a timeout) that iptables rules match before the
// NFQUEUE rule, so repeat connections between the same endpoints are decided in the kernel.
package offload

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
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

	// mu orders kernel writes against Flush: an entry decided under generation g is written
	// only while no Flush to a later generation has happened, so none survives a policy change.
	mu  sync.Mutex
	gen atomic.Uint64

	closeOnce sync.Once
	closed    bool // under mu: the sets are gone

	recorded, dropped, skipped, stale, added, errs, flushes atomic.Uint64
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

// RecordGen queues a flow decided under snapshot generation gen for the kernel. It never blocks
// and never allocates: when the queue is full the flow is counted as dropped and stays in user
// space. Call it for every verdict given to a queued packet (cache hit or miss): a packet that
// reached the queue proves the kernel does not hold its flow (yet, or any more). A verdict from a
// generation older than the last FlushGen is discarded, which closes the window where a packet
// decided under the old snapshot is recorded just after the flush.
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

func (o *Offload) stats() stats {
	return stats{
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

var (
	descRecorded = prometheus.NewDesc("sluice_offload_recorded_total", "Verdicts queued for the kernel offload sets.", nil, nil)
	descDropped  = prometheus.NewDesc("sluice_offload_queue_dropped_total", "Verdicts not offloaded because the writer's queue was full (their flows stay in user space).", nil, nil)
	descSkipped  = prometheus.NewDesc("sluice_offload_skipped_total", "Verdicts the sets cannot key on (not TCP, UDP or SCTP).", nil, nil)
	descStale    = prometheus.NewDesc("sluice_offload_stale_total", "Queued verdicts discarded because a newer snapshot was put in force first.", nil, nil)
	descAdded    = prometheus.NewDesc("sluice_offload_added_total", "Entries written to the kernel offload sets.", nil, nil)
	descErrors   = prometheus.NewDesc("sluice_offload_write_errors_total", "Kernel writes to the offload sets that failed.", nil, nil)
	descFlushes  = prometheus.NewDesc("sluice_offload_flushes_total", "Flushes of the offload sets (one per snapshot).", nil, nil)
)

// Describe implements prometheus.Collector.
func (o *Offload) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRecorded, descDropped, descSkipped, descStale, descAdded, descErrors, descFlushes} {
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
		{descAdded, st.Added}, {descErrors, st.Errors}, {descFlushes, st.Flushes}} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v))
	}
}
