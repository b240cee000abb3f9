package policy

import (
	"net/netip"
	"slices"

	"github.com/gaissmai/bart"
)

// Snapshot is the compiled decision structure: an immutable index of one State, built by
// Compile and safe for concurrent use without locks.
//
// Layout, chosen so that Decide touches few cache lines and never allocates, and so that memory
// follows the size of the policies, not pods times policies:
//   - by4 and by6 map every participating pod address to its pod (one map lookup per end,
//     keyed by the address bytes so the key is small and hashes fast), in shards by the
//     address's last byte so that a Builder's pod change copies one small map, not all;
//   - hot holds, per pod, only what Decide reads (locality, isolation and ranges of two flat
//     arrays), apart from the names and addresses Explain needs; hot and pods are paged for the
//     same reason;
//   - entries lays out, per policy and direction, the port entries of its rules (16 bytes each,
//     contiguous), and lists holds, per local pod and direction, the entry ranges of the
//     policies isolating it (pods isolated by the same policies share one list), so Decide never
//     scans unrelated policies and only touches a rule (for its peers) when one of its ports
//     matches; remote pods have none, since their own node judges them;
//   - each distinct peer selector is resolved once to a podSet (bitset or sorted list);
//   - each rule's ipBlocks (cidr minus except, over all its peers) are flattened into one
//     disjoint prefix set held in a bart.Lite routing table.
type Snapshot struct {
	opt    Options
	serial uint64 // see Serial
	// The last patches that led to this snapshot, oldest first, and for each address they
	// touched the serial of the latest snapshot that touched it (changes.go).
	steps     []step
	touchedAt map[netip.Addr]uint64
	by4       [addrShards]map[[4]byte]podID
	by6       [addrShards]map[[16]byte]podID
	// shardMask picks an address's shard from its last byte; fixed between full compiles.
	shardMask uint8
	hot       [][]podHot  // pages of pageSize, indexed by podID (see hotOf)
	lists     []span      // podHot.ingress and .egress ranges index this; each an entries range
	entries   []portEntry // cpolicy.ingressAt and .egressAt, and so lists, index this
	ports     []namedPort // podHot.ports ranges index this
	pods      [][]cpod    // pages like hot; a dead pod (a Builder's deleted one) is in no map or set
	npods     int         // pod ids in use, dead ones included
	dead      int
	rules     []crule
	policies  []cpolicy
	sets      []podSet
	names     []string // portName -> the name
	stats     Stats
}

// Stats counts what a snapshot holds.
type Stats struct {
	Namespaces int `json:"namespaces"`
	Pods       int `json:"pods"` // participating pods (not hostNetwork, running, with an IP)
	LocalPods  int `json:"localPods"`
	Policies   int `json:"policies"`
	Rules      int `json:"rules"`
	PeerSets   int `json:"peerSets"` // distinct peer selectors resolved to pod sets (after a Builder's patches, also those only replaced policies used, until its next full compile)
	Invalid    int `json:"invalid"`  // policies that did not compile, isolating only (Options.IsolateInvalid)
}

// podID indexes Snapshot.pods (and hot). As netip.Addr{} is no address, noPod is no pod: the
// owner of an address that is no pod's.
type podID int32

const noPod podID = -1

func (p podID) isPod() bool { return p >= 0 }

// ruleID indexes Snapshot.rules; noRule is none.
type ruleID int32

const noRule ruleID = -1

// portName is a named port's name interned to a small number; noName marks a numeric port.
type portName int32

const noName portName = -1

// match is what part of a rule matched a flow: the spec index of the peer (or port) that did,
// anyMatch when the rule has no peers (ports) so that every one does, or noMatch.
type match int

const (
	anyMatch match = -1 // RuleRef's -1
	noMatch  match = -2
)

// span is a half-open range [lo, hi) of a flat array.
type span struct{ lo, hi uint32 }

// podHot is what Decide reads of a pod.
type podHot struct {
	ingress, egress span // into Snapshot.lists: the entries of each policy isolating the pod
	ports           span // into Snapshot.ports
	flags           uint8
}

const (
	podLocal uint8 = 1 << iota
	podIngressIsolated
	podEgressIsolated
)

// portEntry is one port of one rule, or the whole rule when it has no ports (proto 0).
type portEntry struct {
	lo, hi uint16
	name   portName
	rule   ruleID
	proto  Protocol
	anyNum bool // only a protocol was given
}

// cpod is the rest of a pod, for Explain and listings.
type cpod struct {
	ref   PodRef
	node  string
	local bool
	dead  bool
	ips   []netip.Addr
	// Policies (indexes into Snapshot.policies) that isolate this pod, per direction; local
	// pods only.
	ingressBy, egressBy []int32
}

type namedPort struct {
	name  portName
	proto Protocol
	port  uint16
}

type cpolicy struct {
	name                string // namespace/name
	ingress, egress     []ruleID
	ingressAt, egressAt span // the port entries of ingress and egress, into Snapshot.entries
}

func (p *cpolicy) rules(dir Direction) []ruleID {
	if dir == Egress {
		return p.egress
	}
	return p.ingress
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
	policy     int32
	index      int32
	dir        Direction
}

// blockPeer is one ipBlock peer as written, for Explain (Decide reads crule.blocks).
type blockPeer struct {
	index int32
	block block
}

// cport is one port entry: 16 bytes.
type cport struct {
	lo, hi uint16
	name   portName
	index  int32 // position in the rule's ports
	proto  Protocol
	anyNum bool // only a protocol was given
}

// Generation is Options.Generation at compile time.
func (s *Snapshot) Generation() uint64 { return s.opt.Generation }

// resolved is a flow with both ends looked up, as Explain judges it.
type resolved struct {
	Flow
	src, dst podID
}

func (s *Snapshot) resolve(f Flow) resolved {
	return resolved{Flow: f, src: s.lookup(f.Src), dst: s.lookup(f.Dst)}
}

// peer is the end whose address and pod a rule's peers match: the destination for egress,
// the source for ingress. (Named ports always resolve against the destination.)
func (r *resolved) peer(egress bool) (netip.Addr, podID) {
	if egress {
		return r.Dst, r.dst
	}
	return r.Src, r.src
}

// Decide is the hot path: it answers whether f is allowed on this node, with a one-word
// reason. It never allocates and takes no lock. Addresses must be native (an IPv4 address is
// not IPv4-mapped IPv6), as they are in packet headers.
func (s *Snapshot) Decide(f Flow) Verdict {
	src, dst := s.lookup(f.Src), s.lookup(f.Dst)
	isolated := false
	const egress, ingress = podLocal | podEgressIsolated, podLocal | podIngressIsolated
	if src.isPod() {
		if h := s.hotOf(src); h.flags&egress == egress {
			isolated = true
			if !s.anyRule(h.egress, f, src, dst, true) {
				return Verdict{Allowed: false, Reason: ReasonEgress}
			}
		}
	}
	if dst.isPod() {
		if h := s.hotOf(dst); h.flags&ingress == ingress {
			isolated = true
			if !s.anyRule(h.ingress, f, src, dst, false) {
				return Verdict{Allowed: false, Reason: ReasonIngress}
			}
		}
	}
	if isolated {
		return Verdict{Allowed: true, Reason: ReasonRule}
	}
	return Verdict{Allowed: true, Reason: ReasonUnisolated}
}

// lookup finds the pod owning a (native) address.
func (s *Snapshot) lookup(a netip.Addr) podID {
	if a.Is4() {
		k := a.As4()
		if i, ok := s.by4[k[3]&s.shardMask][k]; ok {
			return i
		}
		return noPod
	}
	k := a.As16()
	if i, ok := s.by6[k[15]&s.shardMask][k]; ok {
		return i
	}
	return noPod
}

// addrShards is the most shards of the address maps: a pod change copies one shard. A snapshot
// uses as many as keep about 128 pods per shard (shardMask), so that a small cluster does not
// pay for 256 small maps.
const addrShards = 256

// shardMaskFor is the shard mask for a snapshot of pods pods: a power of two minus one.
func shardMaskFor(pods int) uint8 {
	n := 1
	for n < addrShards && n*128 < pods {
		n *= 2
	}
	return uint8(n - 1)
}

// setOwner maps a (native) address to pod p, or unmaps it when p is noPod, in place: only on a
// snapshot no reader has yet (Compile's, or a Builder's copy whose shard it already copied).
func (s *Snapshot) setOwner(a netip.Addr, p podID) {
	if a.Is4() {
		k := a.As4()
		m := s.by4[k[3]&s.shardMask]
		if m == nil {
			m = make(map[[4]byte]podID)
			s.by4[k[3]&s.shardMask] = m
		}
		if p.isPod() {
			m[k] = p
		} else {
			delete(m, k)
		}
		return
	}
	k := a.As16()
	m := s.by6[k[15]&s.shardMask]
	if m == nil {
		m = make(map[[16]byte]podID)
		s.by6[k[15]&s.shardMask] = m
	}
	if p.isPod() {
		m[k] = p
	} else {
		delete(m, k)
	}
}

// pageBits sizes the pages of hot and pods: a pod change copies one page of each (512 entries,
// about 14 kB of hot and 60 kB of pods).
const (
	pageBits = 9
	pageSize = 1 << pageBits
	pageMask = pageSize - 1
)

// hotOf is what Decide reads of pod p.
func (s *Snapshot) hotOf(p podID) *podHot { return &s.hot[p>>pageBits][p&pageMask] }

// pod is the rest of pod p.
func (s *Snapshot) pod(p podID) *cpod { return &s.pods[p>>pageBits][p&pageMask] }

// livePods yields the ids of the pods that are not dead, in id order.
func (s *Snapshot) livePods(yield func(podID, *cpod) bool) {
	for i := range s.npods {
		p := s.pod(podID(i))
		if p.dead {
			continue
		}
		if !yield(podID(i), p) {
			return
		}
	}
}

// anyRule reports whether one of the port entries of the policies in list (their egress or
// ingress rules) lets f, from pod src to pod dst (either noPod), through. The peer is the
// destination for egress, the source for ingress; named ports resolve against dst. (The
// arguments stay plain values: a struct passed by pointer here measured 10% slower.)
func (s *Snapshot) anyRule(list span, f Flow, src, dst podID, egress bool) bool {
	ip, peer := f.Src, src
	if egress {
		ip, peer = f.Dst, dst
	}
	proto, port := f.Proto, f.Port
	tried := noRule // a rule whose peers were already checked, for rules with several ports
	for _, es := range s.lists[list.lo:list.hi] {
		entries := s.entries[es.lo:es.hi]
		for i := range entries {
			e := &entries[i]
			if e.proto != 0 {
				if e.proto != proto {
					continue
				}
				switch {
				case e.anyNum:
				case e.name != noName:
					if !s.hasNamedPort(dst, e.name, proto, port) {
						continue
					}
				case port < e.lo || port > e.hi:
					continue
				}
			}
			if e.rule == tried {
				continue
			}
			tried = e.rule
			if s.rules[e.rule].peerMatch(s, ip, peer) != noMatch {
				return true
			}
		}
	}
	return false
}

// portMatch says which port of rule r lets the flow through. It is Explain's counterpart of
// the port test anyRule makes on the flattened entries.
func (s *Snapshot) portMatch(rule *crule, r *resolved) match {
	if rule.allPorts {
		return anyMatch
	}
	for i := range rule.ports {
		p := &rule.ports[i]
		if p.proto != r.Proto {
			continue
		}
		switch {
		case p.anyNum:
			return match(p.index)
		case p.name != noName:
			if s.hasNamedPort(r.dst, p.name, r.Proto, r.Port) {
				return match(p.index)
			}
		case r.Port >= p.lo && r.Port <= p.hi:
			return match(p.index)
		}
	}
	return noMatch
}

// peerMatch says which peer of r matches the address ip of pod (noPod: no pod's). Pod peers
// are tried before ipBlocks.
func (r *crule) peerMatch(s *Snapshot, ip netip.Addr, pod podID) match {
	if r.allPeers {
		return anyMatch
	}
	if pod.isPod() {
		for i, si := range r.peerSets {
			if s.sets[si].contains(pod) {
				return match(r.peerIdx[i])
			}
		}
	}
	if r.blocks != nil && r.blocks.Contains(ip) {
		for _, b := range r.blockPeers {
			if b.block.contains(ip) {
				return match(b.index)
			}
		}
	}
	return noMatch
}

// hasNamedPort reports whether pod (noPod: none, which has no ports) has a container port
// called name with that protocol and number.
func (s *Snapshot) hasNamedPort(pod podID, name portName, proto Protocol, port uint16) bool {
	if !pod.isPod() {
		return false
	}
	ps := s.hotOf(pod).ports
	for _, np := range s.ports[ps.lo:ps.hi] {
		if np.name == name && np.proto == proto && np.port == port {
			return true
		}
	}
	return false
}

// Pod returns the pod that owns ip, local or not.
func (s *Snapshot) Pod(ip netip.Addr) (PodRef, bool) {
	i := s.lookup(ip.Unmap())
	if !i.isPod() {
		return PodRef{}, false
	}
	return s.pod(i).ref, true
}

// PodIPs returns the addresses of the named pod, primary first; nil when the pod does not
// take part (unknown, hostNetwork, finished or without an address).
func (s *Snapshot) PodIPs(ref PodRef) []netip.Addr {
	for _, p := range s.livePods {
		if p.ref == ref {
			return append([]netip.Addr(nil), p.ips...)
		}
	}
	return nil
}

// IsLocal reports whether ip belongs to a pod on this node.
func (s *Snapshot) IsLocal(ip netip.Addr) bool {
	i := s.lookup(ip.Unmap())
	return i.isPod() && s.pod(i).local
}

// LocalPodIPs lists every address a local pod owns: the addresses whose packets this node
// must queue. An address several pods claim is listed when its owner (see addressClaim) is
// local, so it is listed once and exactly when IsLocal says so.
func (s *Snapshot) LocalPodIPs() []netip.Addr {
	var out []netip.Addr
	for i, p := range s.livePods {
		if !p.local {
			continue
		}
		for _, a := range p.ips {
			if s.lookup(a) == i {
				out = append(out, a)
			}
		}
	}
	return out
}

// Pods lists the participating pods in (namespace, name) order.
func (s *Snapshot) Pods() []PodRef {
	out := make([]PodRef, 0, s.npods-s.dead)
	for _, p := range s.livePods {
		out = append(out, p.ref)
	}
	// A Builder appends the pods it adds; the order stays the documented one.
	slices.SortFunc(out, PodRef.Compare)
	return out
}

// Stats describes the snapshot's size.
func (s *Snapshot) Stats() Stats { return s.stats }
