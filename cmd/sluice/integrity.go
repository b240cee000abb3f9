package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-dev/sluice/filter/queue"
	"github.com/sluice-dev/sluice/filter/rules"
)

// integrity keeps the agent's kernel state what it installed: every resync interval it checks
// the rules (jumps first in their chains, chains, sets) and repairs them, as kube-proxy and
// Calico resync theirs; checks that bridged pod interfaces reach iptables; retries a failed
// flush of the offload sets; and brings the kernel-side counters up to date.
type integrity struct {
	a *agent

	mu        sync.Mutex
	checkErr  error // why the last check could not make things right (fails /readyz)
	bridgeErr error
	counters  rules.Counters
	unjudged  uint64
	// received is what the packet path had counted when the rules were installed: the rules'
	// counters start then.
	received uint64

	repaired    *prometheus.CounterVec
	checkErrors prometheus.Counter
}

func newIntegrity(a *agent) *integrity {
	g := &integrity{
		a:        a,
		received: totalPackets(a),
		repaired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_rules_repaired_total",
			Help: "Repairs of sluice's kernel rules, by what was found wrong (e.g. \"IPv4 filter jumps\": a jump deleted or no longer first).",
		}, []string{"what"}),
		checkErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_rules_check_errors_total",
			Help: "Rule checks or repairs that failed.",
		}),
	}
	a.reg.MustRegister(g.repaired, g.checkErrors, g)
	return g
}

func (g *integrity) run(ctx context.Context) {
	g.check()
	t := time.NewTicker(g.a.o.resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			g.check()
		}
	}
}

func (g *integrity) check() {
	a := g.a
	var errs []error
	if bridged, err := rules.CheckBridges(a.podIfaces, a.o.setBridgeNF); err != nil {
		a.log.Error("bridged pod traffic would skip sluice; not ready", "err", err)
		g.setBridge(err)
	} else {
		if len(bridged) > 0 && g.bridgeErrSet() {
			a.log.Info("bridged pod interfaces reach iptables", "interfaces", strings.Join(bridged, ","))
		}
		g.setBridge(nil)
	}
	a.mu.Lock()
	r := a.rules
	a.mu.Unlock()
	if r != nil {
		repaired, err := r.Resync()
		for _, what := range repaired {
			g.repaired.WithLabelValues(what).Inc()
		}
		if len(repaired) > 0 {
			a.log.Warn("kernel rules were changed by someone else; repaired", "what", strings.Join(repaired, ", "), "err", err)
		}
		if err != nil {
			g.checkErrors.Inc()
			errs = append(errs, err)
		}
		g.count(r.Counters())
	}
	if a.staleOffload.Load() && a.offload != nil {
		if err := a.offload.Flush(); err != nil {
			a.log.Error("flushing offloaded verdicts still fails", "err", err)
		} else {
			a.staleOffload.Store(false)
			a.log.Info("offloaded verdicts flushed")
		}
	}
	g.mu.Lock()
	g.checkErr = errors.Join(errs...)
	g.mu.Unlock()
}

// count takes the rules' counters and works out what the kernel let through the queue rule
// without a verdict (FAIL_OPEN when the queue overflowed, --queue-bypass while no reader was
// bound): packets that reached the queue rule, less those the agent received, less those still
// waiting in the queue.
func (g *integrity) count(c rules.Counters) {
	received := totalPackets(g.a) - g.received
	var waiting uint64
	if st, err := queue.Stats(); err == nil {
		for _, q := range st {
			waiting += q.Waiting
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.counters = c
	if c.Queued > received+waiting {
		g.unjudged = max(g.unjudged, c.Queued-received-waiting)
	}
}

func totalPackets(a *agent) uint64 {
	var n uint64
	c := a.engine.Counters()
	for v := range c.Packets {
		for _, k := range c.Packets[v] {
			n += k
		}
	}
	return n
}

func (g *integrity) setBridge(err error) {
	g.mu.Lock()
	g.bridgeErr = err
	g.mu.Unlock()
}

func (g *integrity) bridgeErrSet() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.bridgeErr != nil
}

// err is why the agent is not ready as far as its kernel state goes, or nil.
func (g *integrity) err() error {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.bridgeErr != nil {
		return g.bridgeErr
	}
	if g.checkErr != nil {
		return fmt.Errorf("kernel rules cannot be repaired: %w", g.checkErr)
	}
	return nil
}

// offloadErr fails health while verdicts of an older snapshot may survive in the kernel.
func (g *integrity) offloadErr() error {
	if g.a.staleOffload.Load() {
		return errors.New("offloaded verdicts of an older policy could not be flushed")
	}
	return nil
}

var (
	descSpoofed    = prometheus.NewDesc("sluice_antispoof_dropped_total", "Packets from pod interfaces with a source the pod does not own, dropped in the kernel.", nil, nil)
	descUnknownPod = prometheus.NewDesc("sluice_unknown_pod_dropped_total", "Packets of pod interfaces whose address is in no snapshot yet, dropped (fail-closed).", nil, nil)
	descAdmission  = prometheus.NewDesc("sluice_admission_dropped_total", "Packets over the per-source admission limit in front of the queue, dropped in the kernel.", nil, nil)
	descQueued     = prometheus.NewDesc("sluice_queue_rule_packets_total", "Packets that reached sluice's NFQUEUE rule.", nil, nil)
	descUnjudged   = prometheus.NewDesc("sluice_queue_unjudged_total", "Packets the kernel let through the queue rule without a verdict (queue overflow with fail-open, or no reader with --queue-bypass).", nil, nil)
)

// Describe and Collect export the kernel-side counters as of the last check.
func (g *integrity) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSpoofed, descUnknownPod, descAdmission, descQueued, descUnjudged} {
		ch <- d
	}
}

func (g *integrity) Collect(ch chan<- prometheus.Metric) {
	g.mu.Lock()
	c, unjudged := g.counters, g.unjudged
	g.mu.Unlock()
	for _, m := range []struct {
		d *prometheus.Desc
		v uint64
	}{{descSpoofed, c.Spoofed}, {descUnknownPod, c.UnknownPod}, {descAdmission, c.Admission}, {descQueued, c.Queued}, {descUnjudged, unjudged}} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v))
	}
}
