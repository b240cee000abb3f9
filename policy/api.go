package policy

import "net/netip"

// Direction of a rule.
type Direction string

const (
	Ingress Direction = "Ingress"
	Egress  Direction = "Egress"
)

// specField is the name of the direction's rule list in a NetworkPolicy spec.
func (d Direction) specField() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}

// peerField is the name of a rule's peer list in this direction.
func (d Direction) peerField() string {
	if d == Egress {
		return "to"
	}
	return "from"
}

// Endpoint describes one end of a flow as the snapshot sees it.
type Endpoint struct {
	IP    netip.Addr `json:"ip"`
	Pod   *PodRef    `json:"pod,omitempty"`  // nil when the address is no pod's
	Local bool       `json:"local"`          // a pod on this node (every pod when Options.Node is empty)
	Node  string     `json:"node,omitempty"` // spec.nodeName of the pod
}

// RuleRef points at the part of a policy that allowed a flow. Indexes are 0-based positions in
// the policy's spec; Peer is -1 when the rule has no peers (all peers), Port -1 when it has no
// ports (all ports).
type RuleRef struct {
	Policy    string    `json:"policy"` // namespace/name
	Direction Direction `json:"direction"`
	Rule      int       `json:"rule"`
	Peer      int       `json:"peer"`
	Port      int       `json:"port"`
}

// Side is the verdict of one direction: egress at the source, ingress at the destination.
type Side struct {
	// Enforced is false when this node does not judge this side (the endpoint is not a local
	// pod); then Allowed is true.
	Enforced bool `json:"enforced"`
	// Isolated is true when some policy selecting the pod has this direction in policyTypes.
	Isolated bool `json:"isolated"`
	// IsolatingPolicies are the policies (namespace/name) selecting the pod for this direction.
	IsolatingPolicies []string `json:"isolatingPolicies,omitempty"`
	Allowed           bool     `json:"allowed"`
	// MatchedBy is every rule that allows the flow (empty when denied or not isolated).
	MatchedBy []RuleRef `json:"matchedBy,omitempty"`
	// Unmatched says, rule by rule, why each rule of the isolating policies that did not
	// allow the flow missed it (its ports, or its peers).
	Unmatched []string `json:"unmatched,omitempty"`
	// Why is one human sentence.
	Why string `json:"why"`
}

// Explanation is the cold-path answer: the verdict and everything that led to it.
type Explanation struct {
	Allowed     bool     `json:"allowed"`
	Reason      string   `json:"reason"` // Verdict.Reason as a word
	Source      Endpoint `json:"source"`
	Destination Endpoint `json:"destination"`
	Protocol    string   `json:"protocol"`
	Port        uint16   `json:"port"`
	Egress      Side     `json:"egress"`
	Ingress     Side     `json:"ingress"`
}
