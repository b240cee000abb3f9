package filter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"

	"github.com/sluice-dev/sluice/policy"
)

// Defaults of the queue readers.
const (
	// DefaultCopyRange is how much of each packet the kernel copies to us: every header we read
	// (IPv4 with options 60 + TCP with options 60, or IPv6 with extension headers), never the
	// payload beyond that.
	DefaultCopyRange   = 160
	DefaultMaxQueueLen = 4096
	// socketBuffer is the receive buffer of each queue socket: a burst of queued packets waits
	// there instead of overrunning (ENOBUFS).
	socketBuffer = 4 << 20
)

// FlowRecorder mirrors decided flows into the kernel so later connections skip the queue (the
// ipset offload, *Offload). RecordGen must not block; FlushGen empties the kernel's copy when a
// new snapshot takes over, and drops verdicts of older generations still on their way.
type FlowRecorder interface {
	RecordGen(gen uint64, f policy.Flow, allowed bool)
	FlushGen(gen uint64) error
}

// Config configures the packet path.
type Config struct {
	QueueNum uint16 // first queue number
	Queues   int    // number of queues (queue-balance), one worker each
	// QueueAll: every packet of flows involving local pods is queued, and sluice keeps its own
	// return table instead of trusting conntrack state.
	QueueAll bool
	// FailOpen sets the FAIL_OPEN queue flag: when the queue is full the kernel accepts.
	FailOpen bool
	// Audit judges and logs, but accepts everything.
	Audit bool
	// CutEstablished deletes the conntrack entries (and return-table entries) of connections a
	// new snapshot denies.
	CutEstablished bool
	CacheSize      int
	MaxQueueLen    uint32
	CopyRange      uint32
	LogEvery       time.Duration
	Log            *slog.Logger
	Metrics        *Metrics
	Offload        FlowRecorder
	// Stall is how long a worker may hold packets without progress before /healthz fails;
	// Exit, before the agent exits so that its supervisor restarts it.
	Stall, Exit time.Duration
	// OnStuck is called when a worker has been stuck for Exit (default: exit the process).
	OnStuck func()
	// FaultStallPort is fault injection for tests of the watchdog: a worker that takes a packet
	// to this destination port never returns. 0 (always, outside tests) disables it.
	FaultStallPort uint16
}

// Dataplane is the packet path: one worker per queue, all reading one atomic snapshot.
type Dataplane struct {
	cfg     Config
	log     *slog.Logger
	m       *Metrics
	snap    atomic.Pointer[policy.Snapshot]
	workers []*worker
	logw    *logWriter
	bound   atomic.Int32
	healthy atomic.Pointer[string] // nil when healthy, else why not
	cutReq  chan struct{}
}

// New prepares the dataplane; Run opens the queues.
func New(cfg Config) *Dataplane {
	if cfg.Queues <= 0 {
		cfg.Queues = 1
	}
	if cfg.CopyRange == 0 {
		cfg.CopyRange = DefaultCopyRange
	}
	if cfg.MaxQueueLen == 0 {
		cfg.MaxQueueLen = DefaultMaxQueueLen
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics()
	}
	if cfg.Stall <= 0 {
		cfg.Stall = 2 * time.Second
	}
	if cfg.Exit <= 0 {
		cfg.Exit = 10 * time.Second
	}
	d := &Dataplane{cfg: cfg, log: cfg.Log, m: cfg.Metrics, cutReq: make(chan struct{}, 1)}
	d.logw = newLogWriter(cfg.Log, cfg.Metrics)
	debug := cfg.Log.Enabled(context.Background(), slog.LevelDebug)
	for i := 0; i < cfg.Queues; i++ {
		w := &worker{
			dp:    d,
			queue: cfg.QueueNum + uint16(i),
			dec:   NewDecoder(),
			cache: NewFlowCache(cfg.CacheSize),
			lim:   newLimiter(cfg.LogEvery, 4096),
			debug: debug,
		}
		// The table is needed in queue-all mode, and in NEW-only mode for connectionless
		// protocols: after a conntrack flush a UDP reply looks like a new datagram, and only
		// the memory of the request tells the two apart.
		w.track = NewReturnTable(cfg.CacheSize)
		d.workers = append(d.workers, w)
	}
	return d
}

// Metrics returns the metrics the dataplane counts into.
func (d *Dataplane) Metrics() *Metrics { return d.m }

// Publish makes s the snapshot every later packet is judged by. Flow caches notice the new
// generation by themselves; the offload is flushed; established connections are cut when
// configured.
func (d *Dataplane) Publish(s *policy.Snapshot) {
	if s == nil {
		return
	}
	old := d.snap.Swap(s)
	d.m.generation.Set(float64(s.Generation()))
	d.m.snapshots.Inc()
	if d.cfg.Offload != nil {
		if err := d.cfg.Offload.FlushGen(s.Generation()); err != nil {
			d.log.Error("flushing offloaded verdicts failed; old verdicts may survive until their timeout", "err", err)
		}
	}
	if old != nil && d.cfg.CutEstablished {
		select {
		case d.cutReq <- struct{}{}:
		default: // a cut is already pending; it will use the newest snapshot
		}
	}
	st := s.Stats()
	d.log.Info("policy snapshot in use", "generation", s.Generation(), "pods", st.Pods,
		"local_pods", st.LocalPods, "policies", st.Policies, "namespaces", st.Namespaces)
}

// Snapshot is the snapshot in use (nil before the first).
func (d *Dataplane) Snapshot() *policy.Snapshot { return d.snap.Load() }

// Ready reports nil once every queue is bound and a snapshot is in use.
func (d *Dataplane) Ready() error {
	if n := int(d.bound.Load()); n < len(d.workers) {
		return fmt.Errorf("%d of %d queues bound", n, len(d.workers))
	}
	if d.snap.Load() == nil {
		return errors.New("no policy snapshot yet")
	}
	return d.Health()
}

// Health reports nil unless a worker is stuck.
func (d *Dataplane) Health() error {
	if why := d.healthy.Load(); why != nil {
		return errors.New(*why)
	}
	return nil
}

// Run binds the queues and serves them until ctx ends. It returns once every queue is bound
// (or one failed to bind); the readers run on until ctx ends, and done is closed after they
// have stopped.
func (d *Dataplane) Run(ctx context.Context) (done <-chan struct{}, err error) {
	var wg sync.WaitGroup
	closeAll := func() {
		for _, w := range d.workers {
			if w.nf != nil {
				_ = w.nf.Close()
			}
		}
	}
	for _, w := range d.workers {
		if err := w.open(ctx); err != nil {
			closeAll()
			return nil, err
		}
		d.bound.Add(1)
	}
	ch := make(chan struct{})
	wg.Add(3)
	go func() { defer wg.Done(); d.logw.run(ctx) }()
	go func() { defer wg.Done(); d.watchdog(ctx) }()
	go func() { defer wg.Done(); d.cutter(ctx) }()
	go func() {
		<-ctx.Done()
		closeAll()
		wg.Wait()
		close(ch)
	}()
	mode := "new-only"
	if d.cfg.QueueAll {
		mode = "queue-all"
	}
	d.log.Info("queues bound", "first", d.cfg.QueueNum, "count", len(d.workers), "mode", mode,
		"fail_open", d.cfg.FailOpen, "audit", d.cfg.Audit, "copy_range", d.cfg.CopyRange)
	return ch, nil
}

// worker serves one queue. Everything in it is touched only by the queue's reader goroutine,
// apart from the atomics the watchdog reads.
type worker struct {
	dp    *Dataplane
	queue uint16
	nf    *nfqueue.Nfqueue
	dec   *Decoder
	pkt   Packet
	cache *FlowCache
	track *ReturnTable
	lim   *limiter
	debug bool

	// busySince is when the worker took the packet it is handling (0 between packets);
	// progress is when it last sent a verdict. The watchdog reads both.
	busySince atomic.Int64
	progress  atomic.Int64
	// watchdog-only state
	waitSince, seenProgress, stallSince int64
}

func (w *worker) open(ctx context.Context) error {
	cfg := w.dp.cfg
	flags := uint32(nfqueue.NfQaCfgFlagGSO)
	if cfg.FailOpen {
		flags |= nfqueue.NfQaCfgFlagFailOpen
	}
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      w.queue,
		MaxPacketLen: cfg.CopyRange,
		MaxQueueLen:  cfg.MaxQueueLen,
		Copymode:     nfqueue.NfQnlCopyPacket,
		Flags:        flags,
		AfFamily:     syscall.AF_INET,
	})
	if err != nil {
		return fmt.Errorf("open NFQUEUE %d: %w (needs root or CAP_NET_ADMIN)", w.queue, err)
	}
	w.nf = nf
	// Overruns are counted by the error callback and the kernel's user_dropped counter; without
	// this option a single overrun would end the read loop.
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		w.dp.log.Warn("cannot set NETLINK_NO_ENOBUFS; overruns will be reported as errors", "queue", w.queue, "err", err)
	}
	if err := nf.Con.SetReadBuffer(socketBuffer); err != nil {
		w.dp.log.Warn("cannot enlarge the queue socket buffer", "queue", w.queue, "err", err)
	}
	w.progress.Store(time.Now().UnixNano())
	if err := nf.RegisterWithErrorFunc(ctx, w.hook, w.onError(ctx)); err != nil {
		_ = nf.Close()
		w.nf = nil
		return fmt.Errorf("bind NFQUEUE %d: %w (is another agent bound to it? stop it or choose --queue-num)", w.queue, err)
	}
	return nil
}

func (w *worker) onError(ctx context.Context) nfqueue.ErrorFunc {
	var lastLog time.Time
	return func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		if errors.Is(err, syscall.ENOBUFS) {
			w.dp.m.enobufs.Inc()
			return 0
		}
		var oe *netlink.OpError
		if errors.As(err, &oe) && oe.Timeout() {
			return 0
		}
		if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return 1
		}
		w.dp.m.recvErrors.Inc()
		if time.Since(lastLog) > 10*time.Second {
			lastLog = time.Now()
			w.dp.log.Error("reading the queue failed; continuing", "queue", w.queue, "err", err)
		}
		// Do not spin on a persistent error; the watchdog reports a worker that stops serving.
		time.Sleep(10 * time.Millisecond)
		return 0
	}
}

func (w *worker) hook(a nfqueue.Attribute) int {
	if a.PacketID == nil {
		return 0
	}
	start := time.Now()
	now := start.UnixNano()
	w.busySince.Store(now)
	var data []byte
	if a.Payload != nil {
		data = *a.Payload
	}
	accept := w.handle(data, now)
	// Timed before the verdict is sent: an accepted packet travels on through the kernel
	// (forwarding, the peer's stack) inside the sendmsg call, which is not sluice's time.
	w.dp.m.latency.Observe(time.Since(start).Seconds())
	v := nfqueue.NfDrop
	if accept {
		v = nfqueue.NfAccept
	}
	if err := w.nf.SetVerdict(*a.PacketID, v); err != nil {
		w.dp.m.verdictErrors.Inc()
	}
	w.busySince.Store(0)
	w.progress.Store(now)
	return 0
}

// handle judges one packet and does the bookkeeping: counters, offload, log lines. It is the
// whole user-space decision and allocates nothing unless a log line is due.
func (w *worker) handle(data []byte, now int64) bool {
	d := w.dp
	s := d.snap.Load()
	p := &w.pkt
	w.dec.Decode(data, p)
	if d.cfg.FaultStallPort != 0 && p.Flow.Port == d.cfg.FaultStallPort && p.Kind == KindPorts {
		d.log.Warn("fault injection: this queue worker stalls now", "queue", w.queue)
		select {}
	}
	var track *ReturnTable
	if d.cfg.QueueAll || (p.Flow.Proto != policy.TCP && p.Kind == KindPorts) {
		track = w.track
	}
	j := judge(s, p, w.cache, track, d.cfg.CutEstablished, now)
	if j.cause <= CauseIngress || j.cause == CauseReply || j.cause == CauseTracked {
		if j.cacheHit {
			d.m.cacheHits.Inc()
		} else if j.cause != CauseTracked {
			d.m.cacheMisses.Inc()
		}
	}
	verdict := verdictAccept
	if !j.accept {
		verdict = verdictDrop
		if d.cfg.Audit {
			verdict = verdictAudit
		}
	}
	d.m.packets[verdict][j.cause].Inc()
	// Denies are offloaded only for packets that open a connection: the kernel set keys on
	// (source, destination, port) and would otherwise also drop the replies of a connection
	// allowed the other way, which sluice admits after a conntrack flush. Audit offloads no
	// deny at all.
	if j.fromPolicy && d.cfg.Offload != nil && (j.accept || (!d.cfg.Audit && p.Opening())) {
		d.cfg.Offload.RecordGen(s.Generation(), p.Flow, j.accept)
	}
	if verdict != verdictAccept || (w.debug && j.cause != CauseTracked) {
		if ok, suppressed := w.lim.allow(p.Flow, now); ok {
			d.logw.send(logRecord{snap: s, pkt: *p, cause: j.cause, verdict: uint8(verdict),
				queue: w.queue, suppressed: suppressed})
		}
	}
	return verdict != verdictDrop
}
