package policy

import (
	"net/netip"

	"github.com/gaissmai/bart"
)

// Snapshot is the compiled decision structure: an immutable index of one State, built by
// Compile and safe for concurrent use without locks.
//
// Layout, chosen so that Decide touches few cache lines and never allocates:
//   - byIP maps every participating pod address to its pod (one map lookup per end);
//   - each pod carries the indexes of the rules that apply to it, per direction, gathered from
//     the policies that select it, so Decide never scans unrelated policies;
//   - each distinct peer selector is resolved once to a podSet (bitset or sorted list);
//   - each rule's ipBlocks (cidr minus except, over all its peers) are flattened into one
//     disjoint prefix set held in a bart.Lite routing table.
type Snapshot struct {
	opt      Options
	pods     []cpod
	byIP     map[netip.Addr]int32
	rules    []crule
	policies []cpolicy
	sets     []podSet
	portName map[string]int32 // interned named-port names
	stats    Stats
}

// Stats counts what a snapshot holds.
type Stats struct {
	Namespaces int `json:"namespaces"`
	Pods       int `json:"pods"` // participating pods (not hostNetwork, running, with an IP)
	LocalPods  int `json:"localPods"`
	Policies   int `json:"policies"`
	Rules      int `json:"rules"`
	PeerSets   int `json:"peerSets"` // distinct peer selectors resolved to pod sets
}

type cpod struct {
	ref   PodRef
	node  string
	local bool
	ips   []netip.Addr
	ports []namedPort
	// Rules (indexes into Snapshot.rules) of the policies selecting this pod, per direction.
	ingress, egress []int32
	// Policies (indexes into Snapshot.policies) that isolate this pod, per direction.
	ingressBy, egressBy []int32
}

type namedPort struct {
	name  int32
	proto Protocol
	port  uint16
}

type cpolicy struct {
	name string // namespace/name
}

type crule struct {
	policy int32
	dir    Direction
	index  int
	// allPeers: the rule has no from/to, so every peer matches.
	allPeers bool
	// peerSets indexes Snapshot.sets, one per pod-selecting peer, in spec order.
	peerSets []int32
	peerIdx  []int // spec index of each entry of peerSets
	// blocks holds the union of the rule's ipBlock peers; nil when it has none.
	blocks *bart.Lite
	// blockPeers are the ipBlock peers one by one, for Explain.
	blockPeers []blockPeer
	// allPorts: the rule has no ports, so every port and protocol matches.
	allPorts bool
	ports    []cport
}

type blockPeer struct {
	index int
	set   *bart.Lite
}

type cport struct {
	proto  Protocol
	anyNum bool // only a protocol was given
	lo, hi uint16
	name   int32 // >= 0 for a named port
	index  int
	text   string // as written, for Explain
}

// Generation is Options.Generation at compile time.
func (s *Snapshot) Generation() uint64 { return s.opt.Generation }

// Node is Options.Node at compile time.
func (s *Snapshot) Node() string { return s.opt.Node }

// Decide is the hot path: it answers whether f is allowed on this node, with a one-word
// reason. It never allocates and takes no lock. Addresses must be native (an IPv4 address is
// not IPv4-mapped IPv6), as they are in packet headers.
func (s *Snapshot) Decide(f Flow) Verdict {
	si, srcPod := s.byIP[f.Src]
	di, dstPod := s.byIP[f.Dst]
	isolated := false
	if srcPod {
		if p := &s.pods[si]; p.local && len(p.egressBy) > 0 {
			isolated = true
			if !s.anyRule(p.egress, f.Dst, di, dstPod, di, dstPod, f) {
				return Verdict{Allowed: false, Reason: ReasonEgress}
			}
		}
	}
	if dstPod {
		if p := &s.pods[di]; p.local && len(p.ingressBy) > 0 {
			isolated = true
			if !s.anyRule(p.ingress, f.Src, si, srcPod, di, true, f) {
				return Verdict{Allowed: false, Reason: ReasonIngress}
			}
		}
	}
	if isolated {
		return Verdict{Allowed: true, Reason: ReasonRule}
	}
	return Verdict{Allowed: true, Reason: ReasonUnisolated}
}

// anyRule reports whether one of rules lets the peer (peerIP, and peer pod pi when peerIsPod)
// through on f's protocol and port; named ports resolve against the destination pod dst.
func (s *Snapshot) anyRule(rules []int32, peerIP netip.Addr, pi int32, peerIsPod bool, dst int32, dstIsPod bool, f Flow) bool {
	for _, ri := range rules {
		r := &s.rules[ri]
		if s.portIndex(r, f, dst, dstIsPod) < -1 {
			continue
		}
		if r.peerIndex(s, peerIP, pi, peerIsPod) >= -1 {
			return true
		}
	}
	return false
}

// portIndex returns the spec index of the first port entry of r that matches f, -1 when r
// has no ports (all match), or -2 when none matches.
func (s *Snapshot) portIndex(r *crule, f Flow, dst int32, dstIsPod bool) int {
	if r.allPorts {
		return -1
	}
	for i := range r.ports {
		p := &r.ports[i]
		if p.proto != f.Proto {
			continue
		}
		switch {
		case p.anyNum:
			return p.index
		case p.name >= 0:
			if dstIsPod && s.pods[dst].hasNamedPort(p.name, f.Proto, f.Port) {
				return p.index
			}
		case f.Port >= p.lo && f.Port <= p.hi:
			return p.index
		}
	}
	return -2
}

// peerIndex returns the spec index of a peer of r that matches, -1 when r has no peers (all
// match), or -2 when none does. Pod peers are tried before ipBlocks.
func (r *crule) peerIndex(s *Snapshot, ip netip.Addr, pi int32, isPod bool) int {
	if r.allPeers {
		return -1
	}
	if isPod {
		for i, si := range r.peerSets {
			if s.sets[si].contains(pi) {
				return r.peerIdx[i]
			}
		}
	}
	if r.blocks != nil && r.blocks.Contains(ip) {
		for _, b := range r.blockPeers {
			if b.set.Contains(ip) {
				return b.index
			}
		}
	}
	return -2
}

func (p *cpod) hasNamedPort(name int32, proto Protocol, port uint16) bool {
	for _, np := range p.ports {
		if np.name == name && np.proto == proto && np.port == port {
			return true
		}
	}
	return false
}

// Pod returns the pod that owns ip, local or not.
func (s *Snapshot) Pod(ip netip.Addr) (PodRef, bool) {
	i, ok := s.byIP[ip.Unmap()]
	if !ok {
		return PodRef{}, false
	}
	return s.pods[i].ref, true
}

// PodIPs returns the addresses of the named pod, primary first; nil when the pod does not
// take part (unknown, hostNetwork, finished or without an address).
func (s *Snapshot) PodIPs(ref PodRef) []netip.Addr {
	for i := range s.pods {
		if s.pods[i].ref == ref {
			return append([]netip.Addr(nil), s.pods[i].ips...)
		}
	}
	return nil
}

// IsLocal reports whether ip belongs to a pod on this node.
func (s *Snapshot) IsLocal(ip netip.Addr) bool {
	i, ok := s.byIP[ip.Unmap()]
	return ok && s.pods[i].local
}

// LocalPodIPs lists every address of every local pod.
func (s *Snapshot) LocalPodIPs() []netip.Addr {
	var out []netip.Addr
	for i := range s.pods {
		if s.pods[i].local {
			out = append(out, s.pods[i].ips...)
		}
	}
	return out
}

// Pods lists the participating pods in (namespace, name) order.
func (s *Snapshot) Pods() []PodRef {
	out := make([]PodRef, len(s.pods))
	for i := range s.pods {
		out[i] = s.pods[i].ref
	}
	return out
}

// Stats describes the snapshot's size.
func (s *Snapshot) Stats() Stats { return s.stats }
