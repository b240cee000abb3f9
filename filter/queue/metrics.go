package queue

import (
	"bufio"
	"errors"
	"os"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the readers' own counters; the kernel's per-queue counters are read at scrape
// time from /proc (see Stats).
type Metrics struct {
	enobufs       prometheus.Counter
	recvErrors    prometheus.Counter
	verdictErrors prometheus.Counter
	markLoops     prometheus.Counter
	stalled       prometheus.Gauge
}

// NewMetrics creates the metrics and registers them, with the kernel's queue counters, on reg
// (a fresh registry when nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	m := &Metrics{
		enobufs:       c("sluice_queue_enobufs_total", "Netlink receive overruns (ENOBUFS): packets the kernel could not hand to the agent."),
		recvErrors:    c("sluice_queue_receive_errors_total", "Other errors reading the queue socket."),
		verdictErrors: c("sluice_verdict_errors_total", "Verdicts that could not be sent to the kernel."),
		markLoops:     c("sluice_queue_mark_loops_total", "Packets queued again although they carried the pass mark (the rules in force do not honour it); accepted outright."),
		stalled:       prometheus.NewGauge(prometheus.GaugeOpts{Name: "sluice_stalled_workers", Help: "Queue workers that made no progress with packets waiting."}),
	}
	reg.MustRegister(m.enobufs, m.recvErrors, m.verdictErrors, m.markLoops, m.stalled, kernelStats{})
	return m
}

// Stat is one line of /proc/net/netfilter/nfnetlink_queue: the kernel's view of one queue in
// the current network namespace.
type Stat struct {
	Queue       uint16
	PortID      uint32
	Waiting     uint64 // packets queued and waiting for a verdict
	Dropped     uint64 // dropped by the kernel: queue full (without fail-open) or no memory
	UserDropped uint64 // dropped because the netlink socket could not take them (ENOBUFS)
}

const procFile = "/proc/net/netfilter/nfnetlink_queue"

// Stats reads the kernel's per-queue counters of the current network namespace. A missing file
// (no queue bound yet, module not loaded) is no queues.
func Stats() ([]Stat, error) {
	f, err := os.Open(procFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	defer f.Close()
	var out []Stat
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
		fs := strings.Fields(sc.Text())
		if len(fs) < 7 {
			continue
		}
		n := func(i int) uint64 { v, _ := strconv.ParseUint(fs[i], 10, 64); return v }
		out = append(out, Stat{Queue: uint16(n(0)), PortID: uint32(n(1)), Waiting: n(2),
			Dropped: n(5), UserDropped: n(6)})
	}
	return out, sc.Err()
}

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
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(q.Dropped), l)
		ch <- prometheus.MustNewConstMetric(descUser, prometheus.CounterValue, float64(q.UserDropped), l)
	}
}
