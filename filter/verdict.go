package filter

import (
	"github.com/sluice-dev/sluice/policy"
)

// Cause is why a packet got its verdict; it labels metrics and log lines. The first four mirror
// policy.Reason.
type Cause uint8

const (
	CauseUnisolated Cause = Cause(policy.ReasonUnisolated)
	CauseRule       Cause = Cause(policy.ReasonRule)
	CauseEgress     Cause = Cause(policy.ReasonEgress)
	CauseIngress    Cause = Cause(policy.ReasonIngress)
	// CauseReply: a packet that cannot open a connection, accepted because the flow the other
	// way is allowed (replies and mid-stream packets after a conntrack flush).
	CauseReply Cause = iota
	// CauseTracked: part of a connection sluice accepted before (the return table).
	CauseTracked
	CauseControl
	CauseFragment
	CauseMalformed
	// CauseNoSnapshot: no policy loaded yet; sluice never drops for lack of state.
	CauseNoSnapshot
	numCauses
)

var causeNames = [numCauses]string{
	"unisolated", "rule", "egress-denied", "ingress-denied",
	"reply", "tracked", "control", "fragment", "malformed", "no-snapshot",
}

func (c Cause) String() string {
	if c < numCauses {
		return causeNames[c]
	}
	return "unknown"
}

// judgement is the outcome of decide for one packet.
type judgement struct {
	accept bool
	cause  Cause
	// fromPolicy is set when the verdict came from the snapshot for the packet's own flow (not
	// the return table, not the reverse flow): only those are offloaded.
	fromPolicy bool
	cacheHit   bool
}

// judge is the verdict logic shared by both modes; pure apart from the worker's cache and
// return table. track is nil when no return table is kept for this packet's protocol.
func judge(s *policy.Snapshot, p *Packet, c *FlowCache, track *ReturnTable, cut bool, now int64) judgement {
	switch p.Kind {
	case KindMalformed:
		return judgement{cause: CauseMalformed}
	case KindFragment:
		return judgement{accept: true, cause: CauseFragment}
	case KindControl:
		return judgement{accept: true, cause: CauseControl}
	}
	if s == nil {
		return judgement{accept: true, cause: CauseNoSnapshot}
	}
	gen := s.Generation()
	var k tuple
	if track != nil {
		k = packetTuple(p)
		if e, ok := track.Lookup(k, now); ok {
			if e.gen == gen || !cut {
				return judgement{accept: true, cause: CauseTracked}
			}
			// A new snapshot and cutting is on: the connection lives only if the flow that
			// opened it is still allowed.
			if v, _ := c.Decide(s, e.orig); v.Allowed {
				track.Restamp(k, e, gen)
				return judgement{accept: true, cause: CauseTracked}
			}
			track.Forget(k)
		}
	}
	v, hit := c.Decide(s, p.Flow)
	if v.Allowed {
		if track != nil {
			track.Record(k, p.Flow, gen, now)
		}
		return judgement{accept: true, cause: Cause(v.Reason), fromPolicy: true, cacheHit: hit}
	}
	if !p.Opening() {
		rf := p.Reverse()
		if rv, _ := c.Decide(s, rf); rv.Allowed {
			if track != nil {
				track.Record(k, rf, gen, now)
			}
			return judgement{accept: true, cause: CauseReply, cacheHit: hit}
		}
	}
	return judgement{cause: Cause(v.Reason), fromPolicy: true, cacheHit: hit}
}
