package filter

import "github.com/sluice-dev/sluice/policy"

// Verdict is what sluice answers for a packet, as metrics and log lines name it.
type Verdict uint8

const (
	Accept Verdict = iota
	Drop
	// AuditDrop: policy denies the packet; it is accepted because of --audit.
	AuditDrop
	numVerdicts
)

var verdictNames = [numVerdicts]string{"accept", "drop", "audit-drop"}

func (v Verdict) String() string {
	if v < numVerdicts {
		return verdictNames[v]
	}
	return "unknown"
}

// Reason is why a packet got its verdict, in one word. The first four are policy's own
// verdict reasons (policyReason maps them); the rest are the packet path's.
type Reason uint8

const (
	ReasonUnisolated Reason = iota
	ReasonRule
	ReasonEgressDenied
	ReasonIngressDenied
	// ReasonTracked: part of a connection sluice accepted before (the return table).
	ReasonTracked
	// ReasonNoConnection: a packet that cannot open a connection and belongs to none sluice
	// accepted (a forged ACK, an unsolicited echo reply).
	ReasonNoConnection
	// ReasonUnrelated: an ICMP error about no connection conntrack holds.
	ReasonUnrelated
	// ReasonControl: neighbour discovery that stays on the link.
	ReasonControl
	ReasonFragment
	ReasonMalformed
	// ReasonNoSnapshot: no policy loaded yet; the verdict follows the fail mode.
	ReasonNoSnapshot
	// reasonUnmapped is a policy.Reason this package does not know; a test keeps it unused.
	reasonUnmapped
	numReasons
)

var reasonNames = [numReasons]string{
	"unisolated", "rule", "egress-denied", "ingress-denied",
	"tracked", "no-connection", "unrelated", "control", "fragment", "malformed", "no-snapshot", "unknown",
}

func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return "unknown"
}

// policyReason maps policy's verdict reason to the packet path's, by name, not by position.
func policyReason(r policy.Reason) Reason {
	switch r {
	case policy.ReasonUnisolated:
		return ReasonUnisolated
	case policy.ReasonRule:
		return ReasonRule
	case policy.ReasonEgress:
		return ReasonEgressDenied
	case policy.ReasonIngress:
		return ReasonIngressDenied
	}
	return reasonUnmapped
}

// cacheUse says whether the flow cache answered a packet's own flow.
type cacheUse uint8

const (
	cacheUnused cacheUse = iota // the verdict came from elsewhere (exempt kinds, the return table)
	cacheHit
	cacheMiss
)

// outcome is the judgement of one packet.
type outcome struct {
	Accept bool
	Reason Reason
	// Judged is set when the verdict came from the snapshot for the packet's own flow (not the
	// return table, not the reverse flow): only those verdicts may be offloaded to the kernel.
	Judged bool
	Cache  cacheUse
}
