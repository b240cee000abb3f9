package filter

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sluice-dev/sluice/policy"
)

// DefaultLogEvery is how often one flow may write a verdict line: the first drop of a flow is
// always logged, repeats (SYN retransmissions, a client retrying) are summed into the next line.
const DefaultLogEvery = 10 * time.Second

// limiter decides whether a verdict line for a flow may be written now. One per worker, no
// lock. It remembers up to max flows; when full it forgets them all (clear keeps the map's
// memory, so steady state does not allocate).
type limiter struct {
	every int64
	max   int
	seen  map[policy.Flow]limitState
}

type limitState struct {
	next       int64
	suppressed uint32
}

func newLimiter(every time.Duration, max int) *limiter {
	if every <= 0 {
		every = DefaultLogEvery
	}
	return &limiter{every: int64(every), max: max, seen: make(map[policy.Flow]limitState, max)}
}

// allow reports whether to log the flow now and how many lines were suppressed since the last
// one written.
func (l *limiter) allow(f policy.Flow, now int64) (bool, uint32) {
	st, ok := l.seen[f]
	if ok && now < st.next {
		st.suppressed++
		l.seen[f] = st
		return false, 0
	}
	if !ok && len(l.seen) >= l.max {
		clear(l.seen)
	}
	l.seen[f] = limitState{next: now + l.every}
	return true, st.suppressed
}

// logRecord is what a worker hands to the log writer: plain values, so sending it on a channel
// copies it and allocates nothing. The writer does the expensive part (Explain, formatting).
type logRecord struct {
	snap       *policy.Snapshot
	pkt        Packet
	reason     Reason
	verdict    Verdict
	queue      uint16
	suppressed uint32
}

// logWriter writes verdict lines off the packet path, so a slow log sink (a full pipe) slows
// logging, never packets: when its buffer is full, lines are dropped and counted.
type logWriter struct {
	log     *slog.Logger
	ch      chan logRecord
	dropped *atomic.Uint64
}

func newLogWriter(log *slog.Logger, dropped *atomic.Uint64) *logWriter {
	return &logWriter{log: log, ch: make(chan logRecord, 1024), dropped: dropped}
}

func (w *logWriter) send(r logRecord) {
	select {
	case w.ch <- r:
	default:
		w.dropped.Add(1)
	}
}

func (w *logWriter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-w.ch:
			w.write(r)
		}
	}
}

// Describe names an address for a log line: namespace/pod when s knows it, else the address.
func Describe(s *policy.Snapshot, ip netip.Addr) string {
	if s != nil {
		if p, ok := s.Pod(ip); ok {
			return p.String()
		}
	}
	return ip.String()
}

func (w *logWriter) write(r logRecord) {
	p := &r.pkt
	s := r.snap
	attrs := make([]slog.Attr, 0, 16)
	attrs = append(attrs,
		slog.String("verdict", r.verdict.String()),
		slog.String("src", Describe(s, p.Flow.Src)),
		slog.String("dst", Describe(s, p.Flow.Dst)),
		slog.String("proto", p.Flow.Proto.String()),
		slog.Int("port", int(p.Flow.Port)),
		slog.String("reason", r.reason.String()),
	)
	if p.Flow.Src.IsValid() {
		attrs = append(attrs, slog.String("src_ip", p.Flow.Src.String()), slog.String("dst_ip", p.Flow.Dst.String()))
	}
	if p.Kind != KindPorts {
		attrs = append(attrs, slog.String("kind", p.Kind.String()))
	}
	if s != nil && (r.reason == ReasonEgressDenied || r.reason == ReasonIngressDenied) {
		e := s.Explain(p.Flow)
		side := e.Ingress
		if r.reason == ReasonEgressDenied {
			side = e.Egress
		}
		attrs = append(attrs,
			slog.String("policies", strings.Join(side.IsolatingPolicies, ",")),
			slog.String("why", side.Why))
	}
	if s != nil {
		attrs = append(attrs, slog.Uint64("generation", s.Generation()))
	}
	attrs = append(attrs, slog.Int("queue", int(r.queue)))
	if r.suppressed > 0 {
		attrs = append(attrs, slog.Uint64("suppressed", uint64(r.suppressed)))
	}
	level, msg := slog.LevelInfo, "packet dropped"
	switch r.verdict {
	case Accept:
		level, msg = slog.LevelDebug, "packet accepted"
	case AuditDrop:
		msg = "packet would be dropped (audit)"
	}
	w.log.LogAttrs(context.Background(), level, msg, attrs...)
}
