package filter

import (
	"github.com/sluice-dev/sluice/policy"
)

// judge is the verdict logic of both modes; pure apart from the worker's flow cache and return
// table. track is nil when no return table is kept for this packet's protocol. cut says whether
// connections recorded under an older snapshot must be judged again (--cut-established).
func judge(s *policy.Snapshot, p *Packet, c *FlowCache, track *returnTable, cut bool, now int64) outcome {
	switch p.Kind {
	case KindMalformed:
		return outcome{Reason: ReasonMalformed}
	case KindFragment:
		return outcome{Accept: true, Reason: ReasonFragment}
	case KindControl:
		return outcome{Accept: true, Reason: ReasonControl}
	}
	if s == nil {
		return outcome{Accept: true, Reason: ReasonNoSnapshot}
	}
	gen := s.Generation()
	var k tuple
	if track != nil {
		k = packetTuple(p)
		if e, ok := track.Lookup(k, now); ok {
			if e.gen == gen || !cut {
				return outcome{Accept: true, Reason: ReasonTracked}
			}
			// A new snapshot and cutting is on: the connection lives only if the flow that
			// opened it is still allowed.
			if v, _ := c.Decide(s, e.orig); v.Allowed {
				track.Restamp(k, e, gen)
				return outcome{Accept: true, Reason: ReasonTracked}
			}
			track.Forget(k)
		}
	}
	v, hit := c.Decide(s, p.Flow)
	use := cacheMiss
	if hit {
		use = cacheHit
	}
	if v.Allowed {
		if track != nil {
			track.Record(k, p.Flow, gen, now)
		}
		return outcome{Accept: true, Reason: policyReason(v.Reason), Judged: true, Cache: use}
	}
	if !p.Opening() {
		rf := p.Reverse()
		if rv, _ := c.Decide(s, rf); rv.Allowed {
			if track != nil {
				track.Record(k, rf, gen, now)
			}
			return outcome{Accept: true, Reason: ReasonReply, Cache: use}
		}
	}
	return outcome{Reason: policyReason(v.Reason), Judged: true, Cache: use}
}
