// Package queue is sluice's NFQUEUE I/O: it binds the queues the kernel rules send packets to,
// reads each packet (headers only) on one worker per queue, has it judged by the packet path
// (filter.Path) and gives the verdict back. A watchdog fails health when a worker stops making
// progress with packets waiting, and exits the agent when it stays stuck, because a stuck reader
// black-holes its queue even with --queue-bypass. The kernel's per-queue counters are exported
// as metrics.
package queue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/filter/nfq"
)

// Defaults of the queue readers.
const (
	// DefaultCopyRange is how much of each packet the kernel copies to us: the headers the
	// packet path reads, never the payload beyond them.
	DefaultCopyRange   = filter.HeaderBytes
	DefaultMaxQueueLen = 4096
	// socketBuffer is the receive buffer of each queue socket: a burst of queued packets waits
	// there instead of overrunning (ENOBUFS).
	socketBuffer = 4 << 20
)

// Spec is the one description of the queues, shared by the readers and the kernel rules that
// feed them.
type Spec struct {
	First uint16 // first queue number
	Count int    // queues First..First+Count-1, spread by flow hash (--queue-balance) when > 1
	// FailOpen: with no reader bound (--queue-bypass) or the queue full (the FAIL_OPEN flag),
	// the kernel accepts instead of dropping.
	FailOpen bool
}

// Validate reports a spec that names no queue or runs past queue 65535.
func (s Spec) Validate() error {
	if s.Count < 1 || int(s.First)+s.Count-1 > 65535 {
		return fmt.Errorf("queues: %d queue(s) from number %d: need at least one, numbered up to 65535 (lower --queue-num or --queues)", s.Count, s.First)
	}
	return nil
}

// Last is the highest queue number.
func (s Spec) Last() uint16 { return s.First + uint16(s.Count-1) }

// Handler judges one queued packet (headers only, from the IP header on) taken off the queue at
// start, and says whether it may pass. filter.Path is one.
type Handler interface {
	Handle(data []byte, start time.Time) bool
}

// Config configures the readers.
type Config struct {
	Spec        Spec
	CopyRange   uint32 // DefaultCopyRange when 0
	MaxQueueLen uint32 // DefaultMaxQueueLen when 0
	// Handler returns the handler of one queue's worker; it is called once per queue.
	Handler func(queue uint16) Handler
	// Mark is the pass mark bit: an accepted packet is given NF_REPEAT with this bit added to
	// its mark, so the hook runs again and the rules after sluice's jump still apply (see
	// filter/rules). 0 gives plain NF_ACCEPT, which ends the chain.
	Mark    uint32
	Log     *slog.Logger
	Metrics *Metrics // a private registry when nil
	// Stall is how long a worker may hold packets without progress before Health fails
	// (default 2 s); Exit, before OnStuck runs (default 10 s).
	Stall, Exit time.Duration
	// OnStuck is called when a worker has been stuck for Exit (default: exit the process with
	// status 3, so that its supervisor restarts it).
	OnStuck func()
}

// Queues are the bound queues and their workers.
type Queues struct {
	cfg     Config
	log     *slog.Logger
	m       *Metrics
	workers []*worker
	bound   atomic.Int32
	// unhealthy is nil while every worker makes progress, else why not.
	unhealthy atomic.Pointer[string]
}

// New prepares the readers; Run binds the queues.
func New(cfg Config) (*Queues, error) {
	if err := cfg.Spec.Validate(); err != nil {
		return nil, err
	}
	if cfg.Handler == nil {
		return nil, errors.New("queues: no packet handler")
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
		cfg.Metrics = NewMetrics(nil)
	}
	if cfg.Stall <= 0 {
		cfg.Stall = 2 * time.Second
	}
	if cfg.Exit <= 0 {
		cfg.Exit = 10 * time.Second
	}
	q := &Queues{cfg: cfg, log: cfg.Log, m: cfg.Metrics}
	for i := 0; i < cfg.Spec.Count; i++ {
		n := cfg.Spec.First + uint16(i)
		q.workers = append(q.workers, &worker{q: q, queue: n, h: cfg.Handler(n)})
	}
	return q, nil
}

// Bound reports nil once every queue is bound.
func (q *Queues) Bound() error {
	if n := int(q.bound.Load()); n < len(q.workers) {
		return fmt.Errorf("%d of %d queues bound", n, len(q.workers))
	}
	return nil
}

// Health reports nil unless a worker is stuck.
func (q *Queues) Health() error {
	if why := q.unhealthy.Load(); why != nil {
		return errors.New(*why)
	}
	return nil
}

// Run binds the queues and serves them until ctx ends. It returns once every queue is bound
// (or one failed to bind); the readers run on until ctx ends, and done is closed after they
// have stopped.
func (q *Queues) Run(ctx context.Context) (done <-chan struct{}, err error) {
	closeAll := func() {
		for _, w := range q.workers {
			if w.nf != nil {
				_ = w.nf.Close()
			}
		}
	}
	stats := make([]*nfq.Stats, 0, len(q.workers))
	for _, w := range q.workers {
		if err := w.open(); err != nil {
			closeAll()
			return nil, err
		}
		stats = append(stats, w.nf.Stats())
		q.bound.Add(1)
	}
	q.m.queues.Store(&stats)
	ch := make(chan struct{})
	var wg sync.WaitGroup
	for _, w := range q.workers {
		wg.Add(1)
		go func() { defer wg.Done(); w.serve(ctx) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); q.watchdog(ctx) }()
	go func() {
		<-ctx.Done()
		// Close waits for its reader to leave the receive call, then unbinds the queue.
		closeAll()
		wg.Wait()
		close(ch)
	}()
	q.log.Info("queues bound", "first", q.cfg.Spec.First, "count", len(q.workers),
		"fail_open", q.cfg.Spec.FailOpen, "copy_range", q.cfg.CopyRange)
	return ch, nil
}

// worker serves one queue. Everything in it is touched only by the queue's reader goroutine,
// apart from the atomics the watchdog reads.
type worker struct {
	q     *Queues
	queue uint16
	h     Handler
	nf    *nfq.Queue

	// busySince is when the worker took the packet it is handling (0 between packets);
	// progress is when it last gave a verdict. The watchdog reads both.
	busySince atomic.Int64
	progress  atomic.Int64
	// watchdog-only state
	waitSince, seenProgress, stallSince int64
}

// open binds the worker's queue on sluice's own NFQUEUE socket (filter/nfq): a receive loop
// and verdicts that allocate nothing, on a locked OS thread that blocks in the kernel between
// packets. go-nfqueue, which this replaced on the packet path, cost 2.6 times the C floor per
// packet (bench/ANALYSIS.md).
func (w *worker) open() error {
	cfg := w.q.cfg
	flags := nfq.FlagGSO
	if cfg.Spec.FailOpen {
		flags |= nfq.FlagFailOpen
	}
	var lastLog time.Time
	nf, err := nfq.Open(nfq.Config{
		Queue:       w.queue,
		CopyRange:   cfg.CopyRange,
		MaxQueueLen: cfg.MaxQueueLen,
		Flags:       flags,
		ReadBuffer:  socketBuffer,
		// Several packets read together under load, and their verdicts leave in one write.
		Batch: readBatch,
		// Off the packet path: only on a receive or send error.
		OnError: func(err error) {
			if time.Since(lastLog) > 10*time.Second {
				lastLog = time.Now()
				w.q.log.Error("queue I/O failed; continuing", "queue", w.queue, "err", err)
			}
		},
	})
	if err != nil {
		return err // it names the queue and what to do
	}
	w.nf = nf
	w.progress.Store(time.Now().UnixNano())
	return nil
}

// readBatch is how many queued packets one receive may take (recvmmsg).
const readBatch = 16

// serve runs the reader until the queue is closed. A reader that stops on an error leaves its
// queue bound and unserved: the watchdog sees the packets wait and fails health, then exits.
func (w *worker) serve(ctx context.Context) {
	if err := w.nf.Serve(w.hook); err != nil && ctx.Err() == nil {
		w.q.log.Error("queue reader stopped", "queue", w.queue, "err", err)
	}
}

func (w *worker) hook(p *nfq.Packet) nfq.Verdict {
	start := time.Now()
	now := start.UnixNano()
	w.busySince.Store(now)
	v := nfq.Drop
	switch {
	case !w.h.Handle(p.Payload, start):
	case w.q.cfg.Mark != 0:
		if p.Mark&w.q.cfg.Mark != 0 {
			// The packet came back although it carries the pass mark: the rules in force do
			// not honour it (an older agent's, or someone else's). Repeating would loop, so
			// it is accepted outright, and counted; the rule resync repairs the rules.
			w.q.m.markLoops.Inc()
			v = nfq.Accept
			break
		}
		p.SetMark(p.Mark | w.q.cfg.Mark)
		v = nfq.Repeat
	default:
		v = nfq.Accept
	}
	w.busySince.Store(0)
	w.progress.Store(now)
	return v
}
