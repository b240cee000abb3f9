package policy

import (
	"cmp"
	"encoding/binary"
	"iter"
	"net/netip"
	"slices"

	"github.com/gaissmai/bart"
	"go4.org/netipx"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Compile builds a Snapshot from st, which it only reads. It applies the API server's
// defaulting itself (policyTypes, TCP ports, the namespace name label), so objects straight
// from a file or an informer compile alike. A policy with an invalid selector, CIDR, port or
// policy type, or beyond the size bounds (MaxRules and the others), is a *PolicyError naming
// the policy and the field: compiling it as "match nothing" or "match all" would silently
// change who is allowed. Every such policy is listed in one *CompileError.
//
// By default a CompileError means no snapshot. With Options.IsolateInvalid, Compile returns
// the snapshot together with the CompileError, and each invalid policy in it isolates the pods
// it selects for the directions it declares, with none of its rules (see isolateOnly).
func Compile(st *State, opt Options) (*Snapshot, error) {
	return compile(st, opt, true)
}

// compile is Compile; bounded false skips the size bounds, for the test that shows what they
// prevent.
func compile(st *State, opt Options, bounded bool) (*Snapshot, error) {
	c, err := compileWith(st, opt, bounded)
	if c == nil {
		return nil, err
	}
	return c.s, err
}

// compileWith is compile, returning the compiler (nil when there is no snapshot) for a Builder
// to patch from.
func compileWith(st *State, opt Options, bounded bool) (*compiler, error) {
	c := &compiler{
		bounded:  bounded,
		s:        &Snapshot{opt: opt, serial: serials.Add(1)},
		portIDs:  make(map[string]portName),
		nsLabels: make(map[string]labels.Set),
		nsPods:   make(map[string][]podID),
		selCache: make(map[string]int32),
		nsCache:  make(map[string][]string),
		byLabel:  make(map[string]map[string][]podID),
		lists:    make(map[string]sharedList),
	}
	c.namespaces(st.Namespaces)
	c.pods(st.Pods)
	var bad []PolicyError
	pols := make([]*networkingv1.NetworkPolicy, len(st.Policies))
	for i := range st.Policies {
		pols[i] = &st.Policies[i]
	}
	slices.SortFunc(pols, func(a, b *networkingv1.NetworkPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, np := range pols {
		err := c.policy(np)
		if err == nil {
			continue
		}
		err.Policy = np.Namespace + "/" + np.Name
		bad = append(bad, *err)
		if opt.IsolateInvalid {
			c.isolateOnly(np)
		}
	}
	var err error
	if len(bad) > 0 {
		err = &CompileError{Policies: bad}
		if !opt.IsolateInvalid {
			return nil, err
		}
	}
	c.flatten()
	s := c.s
	s.stats.Namespaces = len(c.nsLabels)
	s.stats.Pods = s.npods
	for _, p := range s.livePods {
		if p.local {
			s.stats.LocalPods++
		}
	}
	s.stats.Policies = len(s.policies)
	s.stats.Rules = len(s.rules)
	s.stats.PeerSets = len(s.sets)
	s.stats.Invalid = len(bad)
	c.err = err
	return c, err
}

type compiler struct {
	s        *Snapshot
	bounded  bool
	nsLabels map[string]labels.Set
	nsNames  []string                      // sorted, every namespace known from objects or pods
	nsPods   map[string][]podID            // namespace -> its participating pods
	portIDs  map[string]portName           // the port names rules use, interned to small ids
	labels   []labels.Set                  // pod index -> the pod's labels (only needed while compiling)
	byLabel  map[string]map[string][]podID // label key -> value -> pods, ascending
	ports    [][]containerPort             // pod -> its named ports, interned in flatten when a rule names them
	selCache map[string]int32              // peer selector key -> index in s.sets
	nsCache  map[string][]string
	lists    map[string]sharedList // isolation lists by direction and policies, shared by pods

	// What a Builder needs to change pods without compiling everything again.
	claims   []uint8     // pod -> addressClaim
	setDefs  []setDef    // s.sets index -> what its members are
	selected []policySel // s.policies index -> whom it isolates
	err      error       // the CompileError of this compile, if any
	key      []byte
}

// sharedList is one isolation list: the policies and the range of Snapshot.lists of their
// entries.
type sharedList struct {
	by []int32
	at span
}

// setDef is what decides membership of a peer set: the pod's namespace is one of nss (sorted)
// and pod (nil: every pod) matches its labels. nss are the namespaces ns matches, or the
// policy's own namespace when ns is nil.
type setDef struct {
	nss []string
	ns  labels.Selector
	pod labels.Selector
}

func (d *setDef) has(ns string, l labels.Set) bool {
	if _, ok := slices.BinarySearch(d.nss, ns); !ok {
		return false
	}
	return d.pod == nil || d.pod.Matches(l)
}

// policySel is whom a compiled policy (namespace and name in ref) isolates: the local pods of
// its namespace that sel matches, for the directions set.
type policySel struct {
	ref     PodRef
	sel     labels.Selector
	ing, eg bool
}

func (c *compiler) namespaces(nss []corev1.Namespace) {
	for i := range nss {
		c.nsLabels[nss[i].Name] = namespaceLabels(nss[i].Name, nss[i].Labels)
	}
}

// namespaceLabels are the labels a namespaceSelector sees: the namespace's own plus
// kubernetes.io/metadata.name=<name>, which the API server sets on every namespace (also on
// one the state only names through its pods or policies: pass nil labels).
func namespaceLabels(name string, own map[string]string) labels.Set {
	l := make(labels.Set, len(own)+1)
	for k, v := range own {
		l[k] = v
	}
	l[corev1.LabelMetadataName] = name
	return l
}

// Participates reports whether a pod takes part in NetworkPolicy: host-network pods' traffic
// is the node's, and finished or address-less pods carry no traffic.
func Participates(p *corev1.Pod) bool {
	if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return false
	}
	return len(PodAddrs(p)) > 0
}

// PodAddrs returns a pod's addresses from status.podIPs (or status.podIP), primary first,
// skipping any that do not parse.
func PodAddrs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil {
			a = a.Unmap()
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	for _, ip := range p.Status.PodIPs {
		add(ip.IP)
	}
	if len(out) == 0 {
		add(p.Status.PodIP)
	}
	return out
}

func (c *compiler) pods(in []corev1.Pod) {
	idx := make([]int, 0, len(in))
	for i := range in {
		if Participates(&in[i]) {
			idx = append(idx, i)
		}
	}
	// (namespace, name) order makes every listing and "who owns a reused IP" deterministic.
	slices.SortFunc(idx, func(a, b int) int {
		return cmp.Or(cmp.Compare(in[a].Namespace, in[b].Namespace), cmp.Compare(in[a].Name, in[b].Name))
	})
	s := c.s
	s.shardMask = shardMaskFor(len(idx))
	pods := make([]cpod, 0, len(idx))
	claims := make([]uint8, 0, len(idx))
	for _, i := range idx {
		p := &in[i]
		pi := podID(len(pods))
		cp := cpod{
			ref:   PodRef{Namespace: p.Namespace, Name: p.Name},
			node:  p.Spec.NodeName,
			local: s.opt.Node == "" || p.Spec.NodeName == s.opt.Node,
			ips:   PodAddrs(p),
		}
		var ports []containerPort
		for cp := range namedContainerPorts(p) {
			ports = append(ports, cp)
		}
		claim := addressClaim(p, cp.local)
		claims = append(claims, claim)
		for _, a := range cp.ips {
			// Pods come in (namespace, name) order, so a tie keeps the first.
			if owner := s.lookup(a); owner.isPod() && claims[owner] <= claim {
				continue
			}
			s.setOwner(a, pi)
		}
		pods = append(pods, cp)
		c.ports = append(c.ports, ports)
		c.labels = append(c.labels, labels.Set(p.Labels))
		for k, v := range p.Labels {
			vals := c.byLabel[k]
			if vals == nil {
				vals = make(map[string][]podID)
				c.byLabel[k] = vals
			}
			vals[v] = append(vals[v], pi)
		}
		c.nsPods[p.Namespace] = append(c.nsPods[p.Namespace], pi)
		if _, ok := c.nsLabels[p.Namespace]; !ok {
			// A pod's namespace exists even when the state omits it; the API server would
			// have labelled it with its name.
			c.nsLabels[p.Namespace] = namespaceLabels(p.Namespace, nil)
		}
	}
	s.pods, s.npods = paginate(pods), len(pods)
	c.claims = claims
	for name := range c.nsLabels {
		c.nsNames = append(c.nsNames, name)
	}
	slices.Sort(c.nsNames)
}

// paginate cuts flat into pages of pageSize without copying. Each page but the last is capped
// at its end, so appending to the last page never writes into another.
func paginate[T any](flat []T) [][]T {
	out := make([][]T, 0, (len(flat)+pageSize-1)/pageSize)
	for lo := 0; lo < len(flat); lo += pageSize {
		hi := min(lo+pageSize, len(flat))
		out = append(out, flat[lo:hi:hi])
	}
	return out
}

// addressClaim ranks a participating pod's claim to its addresses; when pods claim the same
// address, the lowest claim owns it (a stale status during IP reuse, or a pod that still lists
// an address its sandbox gave up). A terminating pod (deletionTimestamp set) loses to any
// other: it may have released the address already. Then a pod on this node beats a remote
// one: a packet of this node's pod interfaces is the local pod's, and letting a remote pod's
// stale status take the address would switch the local pod's enforcement off. Then a Running
// pod beats a Pending or Unknown one. Ties go to the first in (namespace, name) order.
func addressClaim(p *corev1.Pod, local bool) uint8 {
	var c uint8
	if p.DeletionTimestamp != nil {
		c |= 4
	}
	if !local {
		c |= 2
	}
	if p.Status.Phase != corev1.PodRunning {
		c |= 1
	}
	return c
}

// containerPort is a named container port as a NetworkPolicy's named port resolves it.
type containerPort struct {
	name  string
	proto Protocol
	port  uint16
}

// namedContainerPorts yields the named ports of p's containers and sidecars, the protocol
// defaulted to TCP; a port out of range or of an unknown protocol names nothing.
//
// Sidecars are init containers with restartPolicy Always: they run beside the containers for
// the pod's life and serve ports as they do, and Kubernetes resolves a Service's named
// targetPort against them too (since 1.32). Other init containers run to completion before
// the containers start, so their ports never carry the pod's traffic and name nothing.
func namedContainerPorts(p *corev1.Pod) iter.Seq[containerPort] {
	return func(yield func(containerPort) bool) {
		each := func(cs []corev1.Container, sidecarsOnly bool) bool {
			for i := range cs {
				if sidecarsOnly && !IsSidecar(&cs[i]) {
					continue
				}
				for _, port := range cs[i].Ports {
					proto, ok := ProtocolFromK8s(port.Protocol)
					if port.Name == "" || !ok || port.ContainerPort <= 0 || port.ContainerPort > 65535 {
						continue
					}
					if !yield(containerPort{name: port.Name, proto: proto, port: uint16(port.ContainerPort)}) {
						return false
					}
				}
			}
			return true
		}
		if each(p.Spec.Containers, false) {
			each(p.Spec.InitContainers, true)
		}
	}
}

// IsSidecar reports whether an init container is a sidecar (restartPolicy Always), whose
// named ports NetworkPolicy ports can name like a container's.
func IsSidecar(c *corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

// flatten lays the compiled rules out in the snapshot's flat arrays: each policy's port entries
// per direction, then per local pod the list of the entry ranges of the policies isolating it.
// Remote pods get no lists: nothing reads a remote pod's isolation, since its own node judges
// it. Pods isolated by the same policies share one list (and one slice of policy indexes), so a
// policy with thousands of ports costs its size once, not once per pod. Named ports are kept
// for every pod (egress to a remote pod resolves against its ports), but only names some rule
// uses.
func (c *compiler) flatten() {
	s := c.s
	for i := range s.policies {
		p := &s.policies[i]
		p.ingressAt, p.egressAt = c.layOut(p.ingress), c.layOut(p.egress)
	}
	s.hot = paginate(make([]podHot, s.npods))
	for i := range s.npods {
		c.layOutPod(podID(i))
	}
}

// layOutPod fills pod i's hot entry from its cpod (isolating policies) and named ports, on a
// snapshot no reader has yet.
func (c *compiler) layOutPod(i podID) {
	s := c.s
	p, h := s.pod(i), s.hotOf(i)
	*h = podHot{}
	lo := uint32(len(s.ports))
	for _, cp := range c.ports[i] {
		if id, ok := c.portIDs[cp.name]; ok {
			s.ports = append(s.ports, namedPort{name: id, proto: cp.proto, port: cp.port})
		}
	}
	h.ports = span{lo, uint32(len(s.ports))}
	if !p.local || p.dead {
		return
	}
	h.flags |= podLocal
	if len(p.ingressBy) > 0 {
		h.flags |= podIngressIsolated
	}
	if len(p.egressBy) > 0 {
		h.flags |= podEgressIsolated
	}
	p.ingressBy, h.ingress = c.share(p.ingressBy, Ingress)
	p.egressBy, h.egress = c.share(p.egressBy, Egress)
}

// share returns the one isolation list of the policies by (indexes into s.policies, ascending)
// in direction dir, laying it out the first time it is asked for.
func (c *compiler) share(by []int32, dir Direction) ([]int32, span) {
	if len(by) == 0 {
		return nil, span{}
	}
	s := c.s
	c.key = append(c.key[:0], dir.specField()...)
	for _, pi := range by {
		c.key = binary.LittleEndian.AppendUint32(c.key, uint32(pi))
	}
	if l, ok := c.lists[string(c.key)]; ok {
		return l.by, l.at
	}
	lo := uint32(len(s.lists))
	n := 0
	for _, pi := range by {
		at := s.policies[pi].ingressAt
		if dir == Egress {
			at = s.policies[pi].egressAt
		}
		if at.lo < at.hi {
			s.lists = append(s.lists, at)
			n += int(at.hi - at.lo)
		}
	}
	if parts := s.lists[lo:]; len(parts) > 1 && n <= maxCopiedEntries {
		// Few entries: one contiguous copy is faster to scan than the policies' ranges
		// spread over the array, and costs at most maxCopiedEntries entries per list.
		first := uint32(len(s.entries))
		for _, at := range parts {
			s.entries = append(s.entries, s.entries[at.lo:at.hi]...)
		}
		s.lists = append(s.lists[:lo], span{first, uint32(len(s.entries))})
	}
	l := sharedList{by: by, at: span{lo, uint32(len(s.lists))}}
	c.lists[string(c.key)] = l
	return l.by, l.at
}

// maxCopiedEntries bounds the port entries of a pod's policies that flatten copies into one
// contiguous range (16 bytes each): a list longer than that is scanned policy by policy, so
// that no choice of labels makes memory grow as pods times policy size.
const maxCopiedEntries = 64

// layOut appends the port entries of rules to the snapshot's entries.
func (c *compiler) layOut(rules []ruleID) span {
	s := c.s
	lo := uint32(len(s.entries))
	for _, ri := range rules {
		r := &s.rules[ri]
		if r.allPorts {
			s.entries = append(s.entries, portEntry{rule: ri, name: noName})
			continue
		}
		for _, p := range r.ports {
			s.entries = append(s.entries, portEntry{lo: p.lo, hi: p.hi, name: p.name, rule: ri, proto: p.proto, anyNum: p.anyNum})
		}
	}
	return span{lo, uint32(len(s.entries))}
}

func (c *compiler) portName(name string) portName {
	if id, ok := c.portIDs[name]; ok {
		return id
	}
	id := portName(len(c.portIDs))
	c.portIDs[name] = id
	c.s.names = append(c.s.names, name)
	return id
}

// PolicyTypes returns the policy's types after the API server's defaulting: Ingress always,
// Egress too when the policy has egress rules.
func PolicyTypes(np *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(np.Spec.PolicyTypes) == 0 {
		return true, len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

// policy compiles np. On error nothing of np is in the snapshot (peer sets it resolved stay:
// they are shared by selector and harmless).
func (c *compiler) policy(np *networkingv1.NetworkPolicy) *PolicyError {
	cp, err := c.compilePolicy(np)
	if err != nil {
		return err
	}
	c.apply(np, cp.sel, cp.ing, cp.eg, cp.ingRules, cp.egRules)
	return nil
}

// compiledPolicy is a policy's rules, compiled into Snapshot.rules for the policy index
// len(Snapshot.policies), and whom it isolates.
type compiledPolicy struct {
	sel               labels.Selector
	ing, eg           bool
	ingRules, egRules []ruleID
}

// compilePolicy compiles np's rules; apply then adds it to the snapshot.
func (c *compiler) compilePolicy(np *networkingv1.NetworkPolicy) (compiledPolicy, *PolicyError) {
	s := c.s
	spec := field.NewPath("spec")
	if i := invalidPolicyType(np); i >= 0 {
		return compiledPolicy{}, fieldError(spec.Child("policyTypes").Index(i), "%q is not Ingress or Egress", np.Spec.PolicyTypes[i])
	}
	if c.bounded {
		if err := checkSize(np); err != nil {
			return compiledPolicy{}, err
		}
	}
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		return compiledPolicy{}, &PolicyError{Field: spec.Child("podSelector").String(), Err: err}
	}
	pi := int32(len(s.policies))
	ing, eg := PolicyTypes(np)
	nrules := len(s.rules)
	var ingRules, egRules []ruleID
	if ing {
		for i := range np.Spec.Ingress {
			r := &np.Spec.Ingress[i]
			ri, err := c.rule(pi, np.Namespace, Ingress, i, r.From, r.Ports)
			if err != nil {
				s.rules = s.rules[:nrules]
				return compiledPolicy{}, err
			}
			ingRules = append(ingRules, ri)
		}
	}
	if eg {
		for i := range np.Spec.Egress {
			r := &np.Spec.Egress[i]
			ri, err := c.rule(pi, np.Namespace, Egress, i, r.To, r.Ports)
			if err != nil {
				s.rules = s.rules[:nrules]
				return compiledPolicy{}, err
			}
			egRules = append(egRules, ri)
		}
	}
	return compiledPolicy{sel: sel, ing: ing, eg: eg, ingRules: ingRules, egRules: egRules}, nil
}

// isolateOnly compiles what a policy that does not compile says about whom it isolates, and
// nothing it allows: dropping it would allow what it denied. When its pod selector is the
// broken part every pod of its namespace is isolated, since which ones it meant is unknown;
// when a policy type is, both directions are.
func (c *compiler) isolateOnly(np *networkingv1.NetworkPolicy) {
	cp := isolating(np)
	c.apply(np, cp.sel, cp.ing, cp.eg, nil, nil)
}

// isolating is what an invalid policy compiles to: whom it isolates, with no rules.
func isolating(np *networkingv1.NetworkPolicy) compiledPolicy {
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		sel = labels.Everything()
	}
	ing, eg := PolicyTypes(np)
	if invalidPolicyType(np) >= 0 {
		ing, eg = true, true
	}
	return compiledPolicy{sel: sel, ing: ing, eg: eg}
}

// apply adds np with its rules to the snapshot, isolating the local pods sel selects in its
// namespace (remote pods' isolation is their node's business).
func (c *compiler) apply(np *networkingv1.NetworkPolicy, sel labels.Selector, ing, eg bool, ingRules, egRules []ruleID) {
	s := c.s
	pi := int32(len(s.policies))
	s.policies = append(s.policies, cpolicy{name: np.Namespace + "/" + np.Name, ingress: ingRules, egress: egRules})
	c.selected = append(c.selected, policySel{ref: PodRef{Namespace: np.Namespace, Name: np.Name}, sel: sel, ing: ing, eg: eg})
	for _, p := range c.nsPods[np.Namespace] {
		pod := s.pod(p)
		if !pod.local || !sel.Matches(c.labels[p]) {
			continue
		}
		if ing {
			pod.ingressBy = append(pod.ingressBy, pi)
		}
		if eg {
			pod.egressBy = append(pod.egressBy, pi)
		}
	}
}

// invalidPolicyType returns the index of the first policy type that is neither Ingress nor
// Egress, or -1.
func invalidPolicyType(np *networkingv1.NetworkPolicy) int {
	for i, t := range np.Spec.PolicyTypes {
		if t != networkingv1.PolicyTypeIngress && t != networkingv1.PolicyTypeEgress {
			return i
		}
	}
	return -1
}

func (c *compiler) rule(pol int32, ns string, dir Direction, index int, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) (ruleID, *PolicyError) {
	r := crule{policy: pol, dir: dir, index: int32(index), allPeers: len(peers) == 0, allPorts: len(ports) == 0}
	path := field.NewPath("spec").Child(dir.specField()).Index(index)
	var all netipx.IPSetBuilder
	for i := range peers {
		peer := &peers[i]
		at := path.Child(dir.peerField()).Index(i)
		hasSel := peer.PodSelector != nil || peer.NamespaceSelector != nil
		switch {
		case peer.IPBlock != nil && hasSel:
			return 0, fieldError(at, "ipBlock cannot be combined with podSelector or namespaceSelector")
		case peer.IPBlock != nil:
			b, err := parseBlock(peer.IPBlock, at.Child("ipBlock"))
			if err != nil {
				return 0, err
			}
			b.addTo(&all)
			r.blockPeers = append(r.blockPeers, blockPeer{index: int32(i), block: b})
		case hasSel:
			si, err := c.peerSet(ns, peer, at)
			if err != nil {
				return 0, err
			}
			r.peerSets = append(r.peerSets, si)
			r.peerIdx = append(r.peerIdx, int32(i))
		default:
			return 0, fieldError(at, "a peer needs podSelector, namespaceSelector or ipBlock")
		}
	}
	if len(r.blockPeers) > 0 {
		set, err := all.IPSet()
		if err != nil {
			return 0, &PolicyError{Field: path.Child(dir.peerField()).String(), Err: err}
		}
		r.blocks = liteOf(set)
	}
	for i := range ports {
		p := &ports[i]
		at := path.Child("ports").Index(i)
		proto, ok := ProtocolFromK8s(policyPortProtocol(p))
		if !ok {
			return 0, fieldError(at.Child("protocol"), "%q is not TCP, UDP or SCTP", *p.Protocol)
		}
		cp := cport{proto: proto, name: noName, index: int32(i)}
		switch {
		case p.Port == nil:
			if p.EndPort != nil {
				return 0, fieldError(at.Child("endPort"), "needs a numeric port")
			}
			cp.anyNum = true
		case p.Port.Type == intstr.String:
			if p.EndPort != nil {
				return 0, fieldError(at.Child("endPort"), "not allowed with the named port %q", p.Port.StrVal)
			}
			if p.Port.StrVal == "" {
				return 0, fieldError(at.Child("port"), "empty port name")
			}
			cp.name = c.portName(p.Port.StrVal)
		default:
			lo := p.Port.IntVal
			hi := lo
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if lo < 1 || lo > 65535 {
				return 0, fieldError(at.Child("port"), "%d is not in 1-65535", lo)
			}
			if hi < lo || hi > 65535 {
				return 0, fieldError(at.Child("endPort"), "%d must be between port %d and 65535", hi, lo)
			}
			cp.lo, cp.hi = uint16(lo), uint16(hi)
		}
		r.ports = append(r.ports, cp)
	}
	c.s.rules = append(c.s.rules, r)
	return ruleID(len(c.s.rules) - 1), nil
}

// policyPortProtocol is a policy port's protocol after the API server's defaulting (TCP).
func policyPortProtocol(p *networkingv1.NetworkPolicyPort) corev1.Protocol {
	if p.Protocol == nil {
		return corev1.ProtocolTCP
	}
	return *p.Protocol
}

// block is a parsed ipBlock: the addresses in cidr and in none of except.
type block struct {
	cidr   netip.Prefix
	except []netip.Prefix
}

// parseBlock parses the ipBlock b (at path).
func parseBlock(b *networkingv1.IPBlock, path *field.Path) (block, *PolicyError) {
	cidr, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return block{}, fieldError(path.Child("cidr"), "%q is not a CIDR: %v", b.CIDR, err)
	}
	out := block{cidr: cidr.Masked()}
	for i, e := range b.Except {
		ex, err := netip.ParsePrefix(e)
		if err != nil {
			return block{}, fieldError(path.Child("except").Index(i), "%q is not a CIDR: %v", e, err)
		}
		if ex.Addr().Is4() != cidr.Addr().Is4() {
			return block{}, fieldError(path.Child("except").Index(i), "%q is not of the same IP family as cidr %q", e, b.CIDR)
		}
		out.except = append(out.except, ex.Masked())
	}
	return out, nil
}

func (b *block) contains(a netip.Addr) bool {
	if !b.cidr.Contains(a) {
		return false
	}
	for _, e := range b.except {
		if e.Contains(a) {
			return false
		}
	}
	return true
}

// addTo adds b's addresses to sb. IPSetBuilder applies additions and removals in order, so the
// holes are carved out of this block before the next block is added.
func (b *block) addTo(sb *netipx.IPSetBuilder) {
	var one netipx.IPSetBuilder
	one.AddPrefix(b.cidr)
	for _, e := range b.except {
		one.RemovePrefix(e)
	}
	set, _ := one.IPSet() // only errors on invalid prefixes, which parseBlock rejected
	sb.AddSet(set)
}

func liteOf(set *netipx.IPSet) *bart.Lite {
	l := new(bart.Lite)
	for _, p := range set.Prefixes() {
		l.Insert(p)
	}
	return l
}

// peerSet resolves a pod/namespace selector peer to a pod set, once per distinct selector.
func (c *compiler) peerSet(policyNS string, peer *networkingv1.NetworkPolicyPeer, path *field.Path) (int32, *PolicyError) {
	var podSel, nsSel labels.Selector
	var err error
	if peer.PodSelector != nil {
		if podSel, err = metav1.LabelSelectorAsSelector(peer.PodSelector); err != nil {
			return 0, &PolicyError{Field: path.Child("podSelector").String(), Err: err}
		}
	}
	if peer.NamespaceSelector != nil {
		if nsSel, err = metav1.LabelSelectorAsSelector(peer.NamespaceSelector); err != nil {
			return 0, &PolicyError{Field: path.Child("namespaceSelector").String(), Err: err}
		}
	}
	var key string
	if nsSel != nil {
		key = "ns:" + nsSel.String()
	} else {
		key = "in:" + policyNS
	}
	if podSel != nil {
		key += "\x00pod:" + podSel.String()
	}
	if i, ok := c.selCache[key]; ok {
		return i, nil
	}
	var nss []string
	if nsSel == nil {
		nss = []string{policyNS}
	} else {
		nss = c.selectNamespaces(nsSel)
	}
	members := c.selectPods(nss, podSel)
	c.s.sets = append(c.s.sets, newPodSet(members, c.s.npods))
	if podSel != nil && podSel.Empty() {
		podSel = nil
	}
	c.setDefs = append(c.setDefs, setDef{nss: nss, ns: nsSel, pod: podSel})
	i := int32(len(c.s.sets) - 1)
	c.selCache[key] = i
	return i, nil
}

func (c *compiler) selectNamespaces(sel labels.Selector) []string {
	key := sel.String()
	if nss, ok := c.nsCache[key]; ok {
		return nss
	}
	var out []string
	for _, ns := range c.nsNames {
		if sel.Matches(c.nsLabels[ns]) {
			out = append(out, ns)
		}
	}
	c.nsCache[key] = out
	return out
}

// selectPods returns the pods of namespaces nss that podSel (nil: all) matches. With many
// namespaces it starts from the label index of the selector's narrowest equality requirement
// instead of testing every pod, which keeps Compile linear in practice at 50k pods.
func (c *compiler) selectPods(nss []string, podSel labels.Selector) []podID {
	if podSel != nil && podSel.Empty() {
		podSel = nil
	}
	var members []podID
	if cand, ok := c.candidates(podSel); ok && len(nss) > 1 {
		in := make(map[string]bool, len(nss))
		for _, ns := range nss {
			in[ns] = true
		}
		for _, p := range cand {
			if in[c.s.pod(p).ref.Namespace] && podSel.Matches(c.labels[p]) {
				members = append(members, p)
			}
		}
		return members
	}
	for _, ns := range nss {
		for _, p := range c.nsPods[ns] {
			if podSel == nil || podSel.Matches(c.labels[p]) {
				members = append(members, p)
			}
		}
	}
	return members
}

// candidates returns a superset of the pods sel matches, from the label index, when sel has
// an equality (=, ==, in) requirement; ok is false otherwise.
func (c *compiler) candidates(sel labels.Selector) (cand []podID, ok bool) {
	if sel == nil {
		return nil, false
	}
	reqs, _ := sel.Requirements()
	for _, r := range reqs {
		switch r.Operator() {
		case selection.Equals, selection.DoubleEquals, selection.In:
		default:
			continue
		}
		var list []podID
		for v := range r.Values() {
			list = append(list, c.byLabel[r.Key()][v]...)
		}
		if !ok || len(list) < len(cand) {
			cand, ok = list, true
		}
	}
	return cand, ok
}
