package filter

import (
	"github.com/sluice-dev/sluice/policy"
)

// rules the judge follows beyond the snapshot.
type judgeRules struct {
	// cut: connections recorded under an older snapshot are judged again (--cut-established).
	cut bool
	// failOpen: what to do before any snapshot exists.
	failOpen bool
}

// judge is the verdict logic of both modes; pure apart from the worker's flow cache and return
// table.
//
// A packet that cannot open a connection (TCP without a bare SYN, SCTP other than INIT, a
// query reply) is accepted only when it belongs, by its exact 5-tuple, to a connection judge
// accepted as an opening; it never creates state. A TCP SYN or SCTP INIT is always judged by
// policy, whatever the table holds. Datagrams are judged by policy unless they belong to a
// connection already accepted (a reply to a query, the next datagram of a flow).
func judge(s *policy.Snapshot, p *Packet, c *FlowCache, track *returnTable, r judgeRules, now int64) outcome {
	switch p.Kind {
	case KindMalformed:
		return outcome{Reason: ReasonMalformed}
	case KindFragment:
		return outcome{Accept: true, Reason: ReasonFragment}
	case KindError:
		return outcome{Reason: ReasonUnrelated}
	case KindND:
		if p.NDLocal() {
			return outcome{Accept: true, Reason: ReasonControl}
		}
		// Anything else of the kind is judged like a query.
	}
	if s == nil {
		return outcome{Accept: r.failOpen, Reason: ReasonNoSnapshot}
	}
	gen := s.Generation()
	opens := p.Opening()
	if !(opens && (p.Flow.Proto == policy.TCP || p.Flow.Proto == policy.SCTP) && p.Kind == KindPorts) {
		if e, _ := track.lookup(p, now); e != nil && still(s, e, c, r.cut) {
			if p.Flow.Proto == policy.TCP {
				track.ended(e, p.TCPFlags)
			}
			return outcome{Accept: true, Reason: ReasonTracked}
		} else if e != nil {
			track.remove(e) // cut: judged afresh below, as if it had never been
		}
	}
	if !opens {
		return outcome{Reason: ReasonNoConnection}
	}
	v, hit := c.Decide(s, p.Flow)
	use := cacheMiss
	if hit {
		use = cacheHit
	}
	if v.Allowed {
		track.record(p, gen, now)
		return outcome{Accept: true, Reason: policyReason(v.Reason), Judged: true, Cache: use}
	}
	return outcome{Reason: policyReason(v.Reason), Judged: true, Cache: use}
}

// still reports whether a tracked connection stands under snapshot s: always, unless cutting is
// on and s is newer than the snapshot that last judged it, in which case the flow that opened
// it is judged again.
func still(s *policy.Snapshot, e *conn, c *FlowCache, cut bool) bool {
	gen := s.Generation()
	if e.gen == gen || !cut {
		return true
	}
	if v, _ := c.Decide(s, e.opening()); !v.Allowed {
		return false
	}
	e.gen = gen
	return true
}
