package filter

import (
	"context"
	"github.com/ti-mo/conntrack"

	"github.com/sluice-dev/sluice/policy"
)

// cutter deletes the conntrack entries of established connections that the newest snapshot
// denies (--cut-established). Off by default: NetworkPolicy does not say whether a policy
// change affects existing connections, and most implementations (like conntrack-based ones)
// keep them; cutting is for operators who want a new deny to take effect at once.
//
// In queue-all mode the return table is re-judged lazily instead (judge checks the entry's
// generation), and conntrack entries are cut too so that both modes behave the same.
func (d *Dataplane) cutter(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.cutReq:
		}
		s := d.snap.Load()
		if s == nil {
			continue
		}
		n, err := CutDenied(s, d.cfg.Audit, func(f policy.Flow, ct conntrack.Flow) {
			verb := "cutting established connection the new policy denies"
			if d.cfg.Audit {
				verb = "would cut established connection the new policy denies (audit)"
			}
			d.log.Info(verb, "src", endpoint(s, f.Src), "dst", endpoint(s, f.Dst),
				"proto", f.Proto.String(), "port", f.Port, "generation", s.Generation())
		})
		if err != nil {
			d.m.cutErrors.Inc()
			d.log.Error("cutting denied connections failed", "err", err)
		}
		if !d.cfg.Audit {
			d.m.cut.Add(float64(n))
		}
	}
}

// CutDenied dumps the conntrack table of the current network namespace and deletes every entry
// that involves a local pod of s and whose opening flow s denies. It returns how many entries
// were (or, with dryRun, would be) deleted. The judged flow is what the packet path saw: the
// original source, and the reply's source as destination (after any DNAT).
func CutDenied(s *policy.Snapshot, dryRun bool, each func(policy.Flow, conntrack.Flow)) (int, error) {
	c, err := conntrack.Dial(nil)
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
	for _, ct := range flows {
		f, ok := judgedFlow(ct)
		if !ok || !(s.IsLocal(f.Src) || s.IsLocal(f.Dst)) {
			continue
		}
		if s.Decide(f).Allowed {
			continue
		}
		if each != nil {
			each(f, ct)
		}
		n++
		if dryRun {
			continue
		}
		if err := c.Delete(ct); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return n, firstErr
}

func judgedFlow(ct conntrack.Flow) (policy.Flow, bool) {
	o, r := ct.TupleOrig, ct.TupleReply
	src := o.IP.SourceAddress.Unmap()
	dst := r.IP.SourceAddress.Unmap()
	if !src.IsValid() || !dst.IsValid() {
		return policy.Flow{}, false
	}
	f := policy.Flow{Src: src, Dst: dst, Proto: policy.Protocol(o.Proto.Protocol)}
	switch f.Proto {
	case policy.TCP, policy.UDP, policy.SCTP:
		f.Port = r.Proto.SourcePort
	default:
		// ICMP and the rest have no ports to judge; leave them to the packet path.
		return policy.Flow{}, false
	}
	return f, true
}
