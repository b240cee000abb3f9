// Package conntrack cuts established connections that a new policy snapshot denies
// (--cut-established), by deleting their entries from the kernel's connection tracking table.
//
// Off by default: NetworkPolicy does not say whether a policy change affects existing
// connections, and most implementations (like conntrack-based ones) keep them; cutting is for
// operators who want a new deny to take effect at once.
package conntrack

import (
	"context"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	ct "github.com/ti-mo/conntrack"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/policy"
)

// Cutter deletes, after each request, the conntrack entries of connections that the snapshot in
// force denies. Requests made while a cut runs are merged into one more cut.
type Cutter struct {
	snapshot func() *policy.Snapshot
	dryRun   bool
	log      *slog.Logger
	req      chan struct{}
	cut      prometheus.Counter
	errors   prometheus.Counter
}

// NewCutter returns a cutter judging by the snapshot that snapshot returns. With dryRun (audit
// mode) it only logs what it would cut. Its counters are registered on reg (nil: nowhere).
func NewCutter(snapshot func() *policy.Snapshot, dryRun bool, log *slog.Logger, reg prometheus.Registerer) *Cutter {
	if log == nil {
		log = slog.Default()
	}
	c := &Cutter{
		snapshot: snapshot, dryRun: dryRun, log: log, req: make(chan struct{}, 1),
		cut:    prometheus.NewCounter(prometheus.CounterOpts{Name: "sluice_conntrack_cut_total", Help: "Established connections cut because a new snapshot denies them."}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "sluice_conntrack_cut_errors_total", Help: "Failed conntrack dumps or deletes."}),
	}
	if reg != nil {
		reg.MustRegister(c.cut, c.errors)
	}
	return c
}

// Request asks for a cut under the newest snapshot; it never blocks.
func (c *Cutter) Request() {
	select {
	case c.req <- struct{}{}:
	default: // a cut is already pending; it will use the newest snapshot
	}
}

// Run serves requests until ctx ends.
func (c *Cutter) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.req:
		}
		s := c.snapshot()
		if s == nil {
			continue
		}
		n, err := CutDenied(s, c.dryRun, func(f policy.Flow, _ ct.Flow) {
			verb := "cutting established connection the new policy denies"
			if c.dryRun {
				verb = "would cut established connection the new policy denies (audit)"
			}
			c.log.Info(verb, "src", filter.Describe(s, f.Src), "dst", filter.Describe(s, f.Dst),
				"proto", f.Proto.String(), "port", f.Port, "generation", s.Generation())
		})
		if err != nil {
			c.errors.Inc()
			c.log.Error("cutting denied connections failed", "err", err)
		}
		if !c.dryRun {
			c.cut.Add(float64(n))
		}
	}
}

// CutDenied dumps the conntrack table of the current network namespace and deletes every entry
// that involves a local pod of s and whose opening flow s denies. It returns how many entries
// were (or, with dryRun, would be) deleted. The judged flow is what the packet path saw: the
// original source, and the reply's source as destination (after any DNAT).
func CutDenied(s *policy.Snapshot, dryRun bool, each func(policy.Flow, ct.Flow)) (int, error) {
	c, err := ct.Dial(nil)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		return 0, err
	}
	n := 0
	var firstErr error
	for _, f := range flows {
		jf, ok := judgedFlow(f)
		if !ok || !(s.IsLocal(jf.Src) || s.IsLocal(jf.Dst)) {
			continue
		}
		if s.Decide(jf).Allowed {
			continue
		}
		if each != nil {
			each(jf, f)
		}
		n++
		if dryRun {
			continue
		}
		if err := c.Delete(f); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return n, firstErr
}

func judgedFlow(f ct.Flow) (policy.Flow, bool) {
	o, r := f.TupleOrig, f.TupleReply
	src := o.IP.SourceAddress.Unmap()
	dst := r.IP.SourceAddress.Unmap()
	if !src.IsValid() || !dst.IsValid() {
		return policy.Flow{}, false
	}
	jf := policy.Flow{Src: src, Dst: dst, Proto: policy.Protocol(o.Proto.Protocol)}
	switch jf.Proto {
	case policy.TCP, policy.UDP, policy.SCTP:
		jf.Port = r.Proto.SourcePort
	default:
		// ICMP and the rest have no ports to judge; leave them to the packet path.
		return policy.Flow{}, false
	}
	return jf, true
}
