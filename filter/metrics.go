package filter

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// DefaultMetricsAddr keeps metrics on loopback: the agent runs in the host network namespace
// and its counters name pods and policies.
const DefaultMetricsAddr = "127.0.0.1:9963"

// Verdict labels.
const (
	verdictAccept = iota
	verdictDrop
	// verdictAudit: would have been dropped; accepted because of --audit.
	verdictAudit
	numVerdicts
)

var verdictNames = [numVerdicts]string{"accept", "drop", "audit-drop"}

// Metrics are the agent's Prometheus metrics (compile time and propagation are the watch
// package's sluice_watch_* metrics, registered on the same registry by the agent). Every per-packet counter is resolved once here so
// that counting a packet is an atomic add, not a label lookup.
type Metrics struct {
	Registry *prometheus.Registry

	packets       [numVerdicts][numCauses]prometheus.Counter
	latency       prometheus.Histogram
	cacheHits     prometheus.Counter
	cacheMisses   prometheus.Counter
	enobufs       prometheus.Counter
	recvErrors    prometheus.Counter
	verdictErrors prometheus.Counter
	logDropped    prometheus.Counter
	generation    prometheus.Gauge
	snapshots     prometheus.Counter
	cut           prometheus.Counter
	cutErrors     prometheus.Counter
	stalled       prometheus.Gauge
}

// NewMetrics registers sluice's metrics (and the Go runtime's) on a fresh registry.
func NewMetrics() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{Registry: r}
	pk := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_packets_total",
		Help: "Queued packets by verdict (accept, drop, audit-drop) and cause.",
	}, []string{"verdict", "reason"})
	for v := range numVerdicts {
		for c := range numCauses {
			m.packets[v][c] = pk.WithLabelValues(verdictNames[v], Cause(c).String())
		}
	}
	m.latency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "sluice_decision_seconds",
		Help: "User-space decision time per queued packet: decode, flow cache, policy, counters (the verdict syscall excluded).",
		// 250 ns .. ~4 ms
		Buckets: prometheus.ExponentialBuckets(250e-9, 2, 15),
	})
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	m.cacheHits = c("sluice_flow_cache_hits_total", "Verdicts answered by a worker's flow cache.")
	m.cacheMisses = c("sluice_flow_cache_misses_total", "Verdicts computed from the policy snapshot.")
	m.enobufs = c("sluice_queue_enobufs_total", "Netlink receive overruns (ENOBUFS): packets the kernel could not hand to the agent.")
	m.recvErrors = c("sluice_queue_receive_errors_total", "Other errors reading the queue socket.")
	m.verdictErrors = c("sluice_verdict_errors_total", "Verdicts that could not be sent to the kernel.")
	m.logDropped = c("sluice_log_lines_dropped_total", "Verdict log lines dropped because the log writer fell behind.")
	m.generation = g("sluice_snapshot_generation", "Generation of the policy snapshot in use.")
	m.snapshots = c("sluice_snapshots_total", "Policy snapshots received.")
	m.cut = c("sluice_conntrack_cut_total", "Established connections cut because a new snapshot denies them.")
	m.cutErrors = c("sluice_conntrack_cut_errors_total", "Failed conntrack dumps or deletes.")
	m.stalled = g("sluice_stalled_workers", "Queue workers that made no progress with packets waiting.")
	r.MustRegister(pk, m.latency, m.cacheHits, m.cacheMisses, m.enobufs, m.recvErrors,
		m.verdictErrors, m.logDropped, m.generation, m.snapshots, m.cut,
		m.cutErrors, m.stalled, queueStats{},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Serve exposes /metrics, /healthz and /readyz on addr until ctx ends. health and ready
// return nil when fine, or the reason they are not.
func (m *Metrics) Serve(ctx context.Context, addr string, health, ready func() error) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	probe := func(f func() error) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if err := f(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		}
	}
	mux.Handle("/healthz", probe(health))
	mux.Handle("/readyz", probe(ready))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener on %s: %w (choose another --metrics-addr)", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// QueueStat is one line of /proc/net/netfilter/nfnetlink_queue.
type QueueStat struct {
	Queue       uint16
	PortID      uint32
	Waiting     uint64 // packets queued and waiting for a verdict
	Dropped     uint64 // dropped by the kernel: queue full (without fail-open) or no memory
	UserDropped uint64 // dropped because the netlink socket could not take them (ENOBUFS)
}

const queueProcFile = "/proc/net/netfilter/nfnetlink_queue"

// ReadQueueStats reads the kernel's per-queue counters of the current network namespace. A
// missing file (no queue bound yet, module not loaded) is no queues.
func ReadQueueStats() ([]QueueStat, error) {
	f, err := os.Open(queueProcFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	defer f.Close()
	var out []QueueStat
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
		fs := strings.Fields(sc.Text())
		if len(fs) < 7 {
			continue
		}
		n := func(i int) uint64 { v, _ := strconv.ParseUint(fs[i], 10, 64); return v }
		out = append(out, QueueStat{Queue: uint16(n(0)), PortID: uint32(n(1)), Waiting: n(2),
			Dropped: n(5), UserDropped: n(6)})
	}
	return out, sc.Err()
}

type queueStats struct{}

var (
	descWaiting = prometheus.NewDesc("sluice_queue_waiting", "Packets waiting in the kernel queue for a verdict.", []string{"queue"}, nil)
	descDropped = prometheus.NewDesc("sluice_queue_dropped_total", "Packets the kernel dropped at the queue (queue full without fail-open).", []string{"queue"}, nil)
	descUser    = prometheus.NewDesc("sluice_queue_user_dropped_total", "Packets the kernel dropped because the agent's socket was full.", []string{"queue"}, nil)
)

func (queueStats) Describe(ch chan<- *prometheus.Desc) {
	ch <- descWaiting
	ch <- descDropped
	ch <- descUser
}

func (queueStats) Collect(ch chan<- prometheus.Metric) {
	st, _ := ReadQueueStats()
	for _, q := range st {
		l := strconv.Itoa(int(q.Queue))
		ch <- prometheus.MustNewConstMetric(descWaiting, prometheus.GaugeValue, float64(q.Waiting), l)
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(q.Dropped), l)
		ch <- prometheus.MustNewConstMetric(descUser, prometheus.CounterValue, float64(q.UserDropped), l)
	}
}
