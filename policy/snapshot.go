package policy

import (
	"net/netip"

	"github.com/gaissmai/bart"
)

// Snapshot is the compiled decision structure: an immutable index of one State, built by
// Compile and safe for concurrent use without locks.
//
// Layout, chosen so that Decide touches few cache lines and never allocates:
//   - by4 and by6 map every participating pod address to its pod (one map lookup per end,
//     keyed by the address bytes so the key is small and hashes fast);
//   - hot holds, per pod, only what Decide reads (28 bytes: locality, isolation and ranges of
//     two flat arrays), apart from the names and addresses Explain needs;
//   - entries lays out, per pod and direction, the port entries of every rule of the policies
//     selecting it (16 bytes each, contiguous), so Decide never scans unrelated policies and
//     only touches a rule (for its peers) when one of its ports matches;
//   - each distinct peer selector is resolved once to a podSet (bitset or sorted list);
//   - each rule's ipBlocks (cidr minus except, over all its peers) are flattened into one
//     disjoint prefix set held in a bart.Lite routing table.
type Snapshot struct {
	opt      Options
	by4      map[[4]byte]int32
	by6      map[[16]byte]int32
	hot      []podHot
	entries  []portEntry // podHot.ingress and .egress ranges index this
	ports    []namedPort // podHot.ports ranges index this
	pods     []cpod
	rules    []crule
	policies []cpolicy
	sets     []podSet
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
	Invalid    int `json:"invalid"`  // policies that did not compile, isolating only (Options.IsolateInvalid)
}

// span is a half-open range [lo, hi) of a flat array.
type span struct{ lo, hi uint32 }

// podHot is what Decide reads of a pod.
type podHot struct {
	ingress, egress span // into Snapshot.entries
	ports           span // into Snapshot.ports
	flags           uint8
}

const (
	podLocal uint8 = 1 << iota
	podIngressIsolated
	podEgressIsolated
)

// portEntry is one port of one rule that applies to a pod, or the whole rule when it has no
// ports (proto 0).
type portEntry struct {
	lo, hi uint16
	name   int32 // >= 0 for a named port
	rule   int32 // index into Snapshot.rules
	proto  Protocol
	anyNum bool // only a protocol was given
}

// cpod is the rest of a pod, for Explain and listings.
type cpod struct {
	ref   PodRef
	node  string
	local bool
	ips   []netip.Addr
	// Rules (indexes into Snapshot.rules) that apply to this pod, per direction.
	ingressRules, egressRules []int32
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

// crule is one compiled rule. The fields Decide reads come first, so a rule's hot part
// shares a cache line; the rest serves Explain.
type crule struct {
	allPeers bool // no from/to: every peer matches
	allPorts bool // no ports: every port and protocol matches
	ports    []cport
	// peerSets indexes Snapshot.sets, one per pod-selecting peer, in spec order.
	peerSets []int32
	// blocks holds the union of the rule's ipBlock peers; nil when it has none.
	blocks *bart.Lite

	peerIdx    []int32     // spec index of each entry of peerSets
	blockPeers []blockPeer // the ipBlock peers one by one
	portText   []string    // each port as written, parallel to ports
	policy     int32
	index      int32
	dir        Direction
}

type blockPeer struct {
	index int32
	set   *bart.Lite
}

// cport is one port entry: 16 bytes.
type cport struct {
	lo, hi uint16
	name   int32 // >= 0 for a named port
	index  int32 // position in the rule's ports
	proto  Protocol
	anyNum bool // only a protocol was given
}

// Generation is Options.Generation at compile time.
func (s *Snapshot) Generation() uint64 { return s.opt.Generation }

// Decide is the hot path: it answers whether f is allowed on this node, with a one-word
// reason. It never allocates and takes no lock. Addresses must be native (an IPv4 address is
// not IPv4-mapped IPv6), as they are in packet headers.
func (s *Snapshot) Decide(f Flow) Verdict {
	si, srcPod := s.lookup(f.Src)
	di, dstPod := s.lookup(f.Dst)
	isolated := false
	const egress, ingress = podLocal | podEgressIsolated, podLocal | podIngressIsolated
	if srcPod && s.hot[si].flags&egress == egress {
		isolated = true
		if !s.anyRule(s.hot[si].egress, f.Dst, di, dstPod, di, dstPod, f) {
			return Verdict{Allowed: false, Reason: ReasonEgress}
		}
	}
	if dstPod && s.hot[di].flags&ingress == ingress {
		isolated = true
		if !s.anyRule(s.hot[di].ingress, f.Src, si, srcPod, di, true, f) {
			return Verdict{Allowed: false, Reason: ReasonIngress}
		}
	}
	if isolated {
		return Verdict{Allowed: true, Reason: ReasonRule}
	}
	return Verdict{Allowed: true, Reason: ReasonUnisolated}
}

// lookup finds the pod owning a (native) address.
func (s *Snapshot) lookup(a netip.Addr) (int32, bool) {
	if a.Is4() {
		i, ok := s.by4[a.As4()]
		return i, ok
	}
	i, ok := s.by6[a.As16()]
	return i, ok
}

// anyRule reports whether one of the port entries in es lets the peer (peerIP, and peer pod
// pi when peerIsPod) through on f's protocol and port; named ports resolve against the
// destination pod dst.
func (s *Snapshot) anyRule(es span, peerIP netip.Addr, pi int32, peerIsPod bool, dst int32, dstIsPod bool, f Flow) bool {
	tried := int32(-1) // a rule whose peers were already checked, for rules with several ports
	for i := es.lo; i < es.hi; i++ {
		e := &s.entries[i]
		if e.proto != 0 {
			if e.proto != f.Proto {
				continue
			}
			switch {
			case e.anyNum:
			case e.name >= 0:
				if !dstIsPod || !s.hasNamedPort(dst, e.name, f.Proto, f.Port) {
					continue
				}
			case f.Port < e.lo || f.Port > e.hi:
				continue
			}
		}
		if e.rule == tried {
			continue
		}
		tried = e.rule
		if s.rules[e.rule].peerIndex(s, peerIP, pi, peerIsPod) >= -1 {
			return true
		}
	}
	return false
}

// portIndex returns the spec index of the first port entry of r that matches f, -1 when r
// has no ports (all match), or -2 when none matches. Explain's counterpart of the port test
// anyRule makes on the flattened entries.
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
			return int(p.index)
		case p.name >= 0:
			if dstIsPod && s.hasNamedPort(dst, p.name, f.Proto, f.Port) {
				return int(p.index)
			}
		case f.Port >= p.lo && f.Port <= p.hi:
			return int(p.index)
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
				return int(r.peerIdx[i])
			}
		}
	}
	if r.blocks != nil && r.blocks.Contains(ip) {
		for _, b := range r.blockPeers {
			if b.set.Contains(ip) {
				return int(b.index)
			}
		}
	}
	return -2
}

func (s *Snapshot) hasNamedPort(pod int32, name int32, proto Protocol, port uint16) bool {
	ps := s.hot[pod].ports
	for _, np := range s.ports[ps.lo:ps.hi] {
		if np.name == name && np.proto == proto && np.port == port {
			return true
		}
	}
	return false
}

// Pod returns the pod that owns ip, local or not.
func (s *Snapshot) Pod(ip netip.Addr) (PodRef, bool) {
	i, ok := s.lookup(ip.Unmap())
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
	i, ok := s.lookup(ip.Unmap())
	return ok && s.pods[i].local
}

// LocalPodIPs lists every address of every local pod: the addresses whose packets this node
// must queue. When two pods claim one address (a stale status during IP reuse), the address
// may be listed though IsLocal names a remote owner; queueing it is harmless.
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
