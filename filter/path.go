package filter

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/sluice-dev/sluice/policy"
)

// FlowRecorder mirrors decided flows into the kernel so later connections skip the queue (the
// ipset offload, filter/offload). Record, given the serial of the deciding snapshot, must not
// block; Publish puts a new snapshot in force there: the kernel's copies of the verdicts it may
// have changed go, and so do such verdicts still on their way.
type FlowRecorder interface {
	Record(serial uint64, f policy.Flow, allowed bool)
	Publish(s *policy.Snapshot) error
}

// Config configures the packet path.
type Config struct {
	// QueueAll: every packet of local pods' flows is queued, and sluice keeps its own return
	// table instead of trusting conntrack state.
	QueueAll bool
	// Audit judges and logs, but accepts everything.
	Audit bool
	// CutEstablished: connections in the return table are judged again under a new snapshot.
	CutEstablished bool
	// FailOpen: before the first snapshot packets are accepted (else dropped).
	FailOpen  bool
	CacheSize int           // flows remembered per worker (DefaultCacheSize when 0)
	LogEvery  time.Duration // how often one flow may write a verdict line (DefaultLogEvery)
	Log       *slog.Logger
	Offload   FlowRecorder
	// FaultStallPort is fault injection for tests of the watchdog: a worker that takes a packet
	// to this destination port never returns. 0 (always, outside tests) disables it.
	FaultStallPort uint16
}

// Engine is what every queue worker shares: the snapshot in force (one atomic pointer), the
// counters, the log writer and the offload.
type Engine struct {
	cfg   Config
	log   *slog.Logger
	count counterSet
	snap  atomic.Pointer[policy.Snapshot]
	logw  *logWriter
	debug bool
	rules judgeRules
}

// NewEngine prepares the packet path; RunLog must run for verdict lines to be written.
func NewEngine(cfg Config) *Engine {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	e := &Engine{
		cfg:   cfg,
		log:   cfg.Log,
		debug: cfg.Log.Enabled(context.Background(), slog.LevelDebug),
		rules: judgeRules{cut: cfg.CutEstablished, failOpen: cfg.FailOpen},
	}
	e.logw = newLogWriter(cfg.Log, &e.count.logDropped)
	return e
}

// Counters sums what every worker counted.
func (e *Engine) Counters() Counters { return e.count.sum() }

// Publish makes s the snapshot every later packet is judged by. Flow caches notice the new
// snapshot by themselves and keep what it vouches for; the offload drops what it does not. It
// returns the offload's error: until a flush succeeds, verdicts of the old snapshot may
// survive in the kernel.
func (e *Engine) Publish(s *policy.Snapshot) error {
	if s == nil {
		return nil
	}
	// The offload first: once it has s, a verdict of the old snapshot still being recorded
	// lands only if s vouches for it, and the kernel has dropped what s changed by the time s
	// (and its generation, which tests and operators wait on) is in force.
	var err error
	if e.cfg.Offload != nil {
		err = e.cfg.Offload.Publish(s)
	}
	e.snap.Store(s)
	e.count.generation.Store(s.Generation())
	e.count.snapshots.Add(1)
	st := s.Stats()
	e.log.Info("policy snapshot in use", "generation", s.Generation(), "pods", st.Pods,
		"local_pods", st.LocalPods, "policies", st.Policies, "namespaces", st.Namespaces)
	return err
}

// Snapshot is the snapshot in force (nil before the first).
func (e *Engine) Snapshot() *policy.Snapshot { return e.snap.Load() }

// RunLog writes verdict lines until ctx ends.
func (e *Engine) RunLog(ctx context.Context) { e.logw.run(ctx) }

// NewPath returns the packet path of one queue worker. A Path is not safe for concurrent use:
// one per worker, each with its own flow cache and return table.
func (e *Engine) NewPath(queue uint16) *Path {
	p := &Path{
		e:     e,
		queue: queue,
		dec:   NewDecoder(),
		cache: NewFlowCache(e.cfg.CacheSize),
		// The table is the whole connection state in queue-all mode; in the default mode it is
		// what tells a legitimate packet of an accepted connection from a forged one after a
		// conntrack flush (both arrive as NEW).
		track: newReturnTable(e.cfg.CacheSize),
		lim:   newLimiter(e.cfg.LogEvery, 4096),
		count: e.count.add(),
	}
	e.count.mu.Lock()
	e.count.tables = append(e.count.tables, p.track)
	e.count.mu.Unlock()
	return p
}

// Path is one worker's packet path: decode, judge, record.
type Path struct {
	e     *Engine
	queue uint16
	dec   *Decoder
	pkt   Packet
	cache *FlowCache
	track *returnTable
	lim   *limiter
	count *counters
}

// Handle judges one packet that starts with its IP header, taken off the queue at start, and
// reports whether it may pass. It allocates nothing unless a log line is due.
func (p *Path) Handle(data []byte, start time.Time) bool {
	now := start.UnixNano()
	s := p.e.snap.Load()
	p.dec.Decode(data, &p.pkt)
	p.faultInjection()
	o := judge(s, &p.pkt, p.cache, p.track, p.e.rules, now)
	v := p.record(s, o, now)
	p.count.observe(time.Since(start))
	return v != Drop
}

func (p *Path) faultInjection() {
	if port := p.e.cfg.FaultStallPort; port != 0 && p.pkt.Kind == KindPorts && p.pkt.Flow.Port == port {
		p.e.log.Warn("fault injection: this queue worker stalls now", "queue", p.queue)
		select {}
	}
}

// record turns an outcome into the verdict and does the bookkeeping: counters, offload, log
// lines.
func (p *Path) record(s *policy.Snapshot, o outcome, now int64) Verdict {
	e := p.e
	switch o.Cache {
	case cacheHit:
		p.count.cacheHits.Add(1)
	case cacheMiss:
		p.count.cacheMisses.Add(1)
	}
	v := Accept
	if !o.Accept {
		v = Drop
		if e.cfg.Audit {
			v = AuditDrop
		}
	}
	p.count.packets[v][o.Reason].Add(1)
	// Denies are offloaded only for packets that open a connection: the kernel set keys on
	// (source, destination, port) and would otherwise also drop the replies of a connection
	// allowed the other way, which sluice admits after a conntrack flush. Audit offloads no
	// deny at all.
	if o.Judged && e.cfg.Offload != nil && (o.Accept || (!e.cfg.Audit && p.pkt.Opening())) {
		e.cfg.Offload.Record(s.Serial(), p.pkt.Flow, o.Accept)
	}
	if v != Accept || (e.debug && o.Reason != ReasonTracked) {
		if ok, suppressed := p.lim.allow(p.pkt.Flow, now); ok {
			e.logw.send(logRecord{snap: s, pkt: p.pkt, reason: o.Reason, verdict: v,
				queue: p.queue, suppressed: suppressed})
		}
	}
	return v
}
