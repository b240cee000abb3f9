package queue

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-dev/sluice/filter/nfq"
)

// Metrics are the readers' own counters (kept by each queue's filter/nfq socket and summed at
// scrape time); the kernel's per-queue counters are read at scrape time from /proc (see Stats).
type Metrics struct {
	stalled prometheus.Gauge
	// markLoops counts packets queued again although they carried the pass mark.
	markLoops prometheus.Counter
	// queues are the counters of the bound queues; nil before Run.
	queues atomic.Pointer[[]*nfq.Stats]
}

// NewMetrics creates the metrics and registers them, with the kernel's queue counters, on reg
// (a fresh registry when nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &Metrics{
		stalled: prometheus.NewGauge(prometheus.GaugeOpts{Name: "sluice_stalled_workers", Help: "Queue workers that made no progress with packets waiting."}),
		markLoops: prometheus.NewCounter(prometheus.CounterOpts{Name: "sluice_queue_mark_loops_total",
			Help: "Packets queued again although they carried the pass mark (the rules in force do not honour it); accepted outright."}),
	}
	sum := func(name, help string, f func(*nfq.Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 {
			var n uint64
			if qs := m.queues.Load(); qs != nil {
				for _, s := range *qs {
					n += f(s)
				}
			}
			return float64(n)
		})
	}
	reg.MustRegister(m.stalled, m.markLoops, kernelStats{},
		sum("sluice_queue_enobufs_total", "Netlink receive overruns (ENOBUFS) reported to the agent: packets the kernel could not hand over (see also sluice_queue_user_dropped_total).",
			func(s *nfq.Stats) uint64 { return s.ENOBUFS.Load() }),
		sum("sluice_queue_receive_errors_total", "Other errors reading the queue socket.",
			func(s *nfq.Stats) uint64 { return s.RecvErrors.Load() }),
		sum("sluice_queue_malformed_messages_total", "Queue messages that could not be decoded, were truncated or did not come from the kernel.",
			func(s *nfq.Stats) uint64 { return s.Malformed.Load() + s.Truncated.Load() + s.Foreign.Load() }),
		sum("sluice_verdict_errors_total", "Verdicts that could not be sent to the kernel, or that it refused.",
			func(s *nfq.Stats) uint64 { return s.VerdictErrors.Load() }))
	return m
}

// Stat is the kernel's view of one queue in the agent's network namespace
// (/proc/net/netfilter/nfnetlink_queue).
type Stat = nfq.KernelStats

// Stats reads the kernel's per-queue counters. A missing file (no queue bound yet, module not
// loaded) is no queues.
func Stats() ([]Stat, error) { return nfq.ReadKernelStats() }

type kernelStats struct{}

var (
	descWaiting = prometheus.NewDesc("sluice_queue_waiting", "Packets waiting in the kernel queue for a verdict.", []string{"queue"}, nil)
	descDropped = prometheus.NewDesc("sluice_queue_dropped_total", "Packets the kernel dropped at the queue (queue full without fail-open).", []string{"queue"}, nil)
	descUser    = prometheus.NewDesc("sluice_queue_user_dropped_total", "Packets the kernel dropped because the agent's socket was full.", []string{"queue"}, nil)
)

func (kernelStats) Describe(ch chan<- *prometheus.Desc) {
	ch <- descWaiting
	ch <- descDropped
	ch <- descUser
}

func (kernelStats) Collect(ch chan<- prometheus.Metric) {
	st, _ := Stats()
	for _, q := range st {
		l := strconv.Itoa(int(q.Queue))
		ch <- prometheus.MustNewConstMetric(descWaiting, prometheus.GaugeValue, float64(q.Waiting), l)
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(q.QueueDropped), l)
		ch <- prometheus.MustNewConstMetric(descUser, prometheus.CounterValue, float64(q.UserDropped), l)
	}
}
