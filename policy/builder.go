package policy

import (
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Builder keeps a cluster's objects and the snapshot last built from them, and takes changes
// one object at a time, as an informer delivers them.
//
// A Build after pod and policy changes patches a copy of the last snapshot: a pod change
// (add, delete, labels, addresses, phase) recomputes that pod's address ownership, peer set
// memberships and isolation; a policy change compiles that policy and recomputes the isolation
// of the local pods of its namespace that it selects, before or after. The pages of pods, the
// address shards and the peer sets a change touches are copied and the rest is shared with the
// previous generation, which readers may still be using and which never changes.
//
// A namespace change (add, delete, labels) patches too: the peer sets whose namespace selector
// starts or stops matching it gain or lose its pods.
//
// A policy that names a port no policy named before lays out the named ports again of the pods
// with a port of that name.
//
// With Options.IsolateInvalid a policy that does not compile is patched in too, isolating
// with none of its rules, as Compile does.
//
// A Build compiles everything, as Compile does, for a pod in a namespace known neither by an
// object nor by another pod; after
// CompileAll; and when what patches leave behind (the ids of deleted pods and the rules of
// replaced policies, never reused) reaches a quarter of the live ones, or the arrays patches
// append to have doubled. Every Build's snapshot answers exactly as Compile of State would
// (the differential tests hold it to that after every step).
//
// A Builder is not safe for concurrent use. The objects it reads must not be modified once
// handed over (informer caches' objects never are).
type Builder struct {
	opt  Options
	objs Objects
	own  *memObjects // objs when the Builder keeps its own objects (NewBuilder)

	changed    map[PodRef]struct{} // pods changed since snap
	changedNPs map[PodRef]struct{} // policies changed since snap
	changedNSs map[string]struct{} // namespaces changed since snap
	full       bool                // the next Build compiles everything

	// The last build and what patching it needs; c is nil when there is none to patch.
	snap *Snapshot
	c    *compiler
	ids  map[PodRef]podID // the live pods of snap
	// shared: address -> the live pods that list it, for the addresses more than one pod lists
	// (rare: a stale pod object, a pod being replaced). Any other address's only claimant is
	// its owner in snap; a map of every address would cost about 100 bytes a pod.
	shared     map[netip.Addr][]podID
	singleNS   map[string][]int32     // namespace -> the peer sets drawing from it (and few others)
	multiNS    []int32                // peer sets drawing from more than indexedNamespaces
	nsPolicies map[string][]int32     // namespace -> its live policies' indexes, in name order
	polIDs     map[PodRef]int32       // the live policies of snap
	invalid    map[PodRef]PolicyError // the live policies that do not compile (Options.IsolateInvalid)
	base       arraySizes             // of the last full compile

	patches, compiles int
}

// Objects is where a Builder reads the cluster's objects: one pod or policy by namespace and
// name when it patches, all of them (State) when it compiles everything. An informer's cache is
// one; a Builder made by NewBuilder keeps its own.
type Objects interface {
	Pod(ref PodRef) *corev1.Pod // nil when there is none
	Policy(ref PodRef) *networkingv1.NetworkPolicy
	Namespace(name string) *corev1.Namespace
	State() *State
}

// NewBuilder returns an empty Builder that keeps its own objects, changed with SetPod and the
// others. Its snapshots are compiled with opt (its Generation is ignored: Build takes one).
func NewBuilder(opt Options) *Builder {
	own := &memObjects{
		pods: make(map[PodRef]*corev1.Pod),
		nss:  make(map[string]*corev1.Namespace),
		pols: make(map[PodRef]*networkingv1.NetworkPolicy),
	}
	b := NewBuilderOn(opt, own)
	b.own = own
	return b
}

// NewBuilderOn returns a Builder that reads objs, told of each change by PodChanged,
// PolicyChanged and NamespaceChanged.
func NewBuilderOn(opt Options, objs Objects) *Builder {
	return &Builder{
		opt:        opt,
		objs:       objs,
		changed:    make(map[PodRef]struct{}),
		changedNPs: make(map[PodRef]struct{}),
		changedNSs: make(map[string]struct{}),
		full:       true,
	}
}

// PodChanged says the pod namespace/name was added, changed or deleted in the Builder's Objects.
func (b *Builder) PodChanged(namespace, name string) {
	b.changed[PodRef{Namespace: namespace, Name: name}] = struct{}{}
}

// PolicyChanged says the NetworkPolicy namespace/name was added, changed or deleted.
func (b *Builder) PolicyChanged(namespace, name string) {
	b.changedNPs[PodRef{Namespace: namespace, Name: name}] = struct{}{}
}

// NamespaceChanged says the namespace name was added, changed or deleted.
func (b *Builder) NamespaceChanged(name string) { b.changedNSs[name] = struct{}{} }

// CompileAll makes the next Build compile everything, for a change the caller cannot name.
func (b *Builder) CompileAll() { b.full = true }

// SetPod adds or replaces a pod of a Builder made by NewBuilder.
func (b *Builder) SetPod(p *corev1.Pod) {
	b.own.pods[PodRef{Namespace: p.Namespace, Name: p.Name}] = p
	b.PodChanged(p.Namespace, p.Name)
}

// DeletePod removes a pod of a Builder made by NewBuilder.
func (b *Builder) DeletePod(namespace, name string) {
	delete(b.own.pods, PodRef{Namespace: namespace, Name: name})
	b.PodChanged(namespace, name)
}

// SetNamespace adds or replaces a namespace of a Builder made by NewBuilder.
func (b *Builder) SetNamespace(ns *corev1.Namespace) {
	b.own.nss[ns.Name] = ns
	b.NamespaceChanged(ns.Name)
}

// DeleteNamespace removes a namespace of a Builder made by NewBuilder.
func (b *Builder) DeleteNamespace(name string) {
	delete(b.own.nss, name)
	b.NamespaceChanged(name)
}

// SetPolicy adds or replaces a NetworkPolicy of a Builder made by NewBuilder.
func (b *Builder) SetPolicy(np *networkingv1.NetworkPolicy) {
	b.own.pols[PodRef{Namespace: np.Namespace, Name: np.Name}] = np
	b.PolicyChanged(np.Namespace, np.Name)
}

// DeletePolicy removes a NetworkPolicy of a Builder made by NewBuilder.
func (b *Builder) DeletePolicy(namespace, name string) {
	delete(b.own.pols, PodRef{Namespace: namespace, Name: name})
	b.PolicyChanged(namespace, name)
}

// State is the objects the Builder reads.
func (b *Builder) State() *State { return b.objs.State() }

// memObjects is the objects of a Builder made by NewBuilder.
type memObjects struct {
	pods map[PodRef]*corev1.Pod
	nss  map[string]*corev1.Namespace
	pols map[PodRef]*networkingv1.NetworkPolicy // namespace and name, as for pods
}

func (m *memObjects) Pod(ref PodRef) *corev1.Pod                    { return m.pods[ref] }
func (m *memObjects) Policy(ref PodRef) *networkingv1.NetworkPolicy { return m.pols[ref] }
func (m *memObjects) Namespace(name string) *corev1.Namespace       { return m.nss[name] }

// State lists the objects, each list in (namespace, name) order, sharing them.
func (m *memObjects) State() *State {
	st := &State{
		Namespaces: make([]corev1.Namespace, 0, len(m.nss)),
		Pods:       make([]corev1.Pod, 0, len(m.pods)),
		Policies:   make([]networkingv1.NetworkPolicy, 0, len(m.pols)),
	}
	for _, name := range slices.Sorted(maps.Keys(m.nss)) {
		st.Namespaces = append(st.Namespaces, *m.nss[name])
	}
	for _, ref := range slices.SortedFunc(maps.Keys(m.pods), PodRef.Compare) {
		st.Pods = append(st.Pods, *m.pods[ref])
	}
	for _, ref := range slices.SortedFunc(maps.Keys(m.pols), PodRef.Compare) {
		st.Policies = append(st.Policies, *m.pols[ref])
	}
	return st
}

// Builds counts the builds that patched the last snapshot and those that compiled everything.
func (b *Builder) Builds() (patched, compiled int) { return b.patches, b.compiles }

// Build returns the snapshot of the Builder's objects with generation gen, and the
// *CompileError of the policies that do not compile, as Compile would. When Build returns no
// snapshot, the next one compiles everything again.
func (b *Builder) Build(gen uint64) (*Snapshot, error) {
	opt := b.opt
	opt.Generation = gen
	if b.patchable() {
		if s, ok := b.patch(opt); ok {
			b.patches++
			clear(b.changed)
			clear(b.changedNPs)
			clear(b.changedNSs)
			b.snap = s
			return s, b.c.err
		}
	}
	return b.compileAll(opt)
}

// patchable reports whether the next Build may patch the last snapshot.
func (b *Builder) patchable() bool {
	if b.c == nil || b.full {
		return false
	}
	s := b.snap
	return s.dead <= s.npods/4 && len(s.policies)-s.stats.Policies <= s.stats.Policies/4+16 &&
		sizesOf(s).within(b.base)
}

// arraySizes are the lengths of a snapshot's append-only arrays. Patches append to them and
// leave what they replace behind (a changed pod's named ports, a replaced policy's rules and
// entries), so under a steady churn of relabels, which leaves no dead pod, they would grow
// without end; a full compile once they double drops the leftovers.
// The pod count is among them: the address shards are sized for the pods of the last full
// compile, and a cluster grown far past it would make each pod change copy a large shard.
type arraySizes struct{ pods, ports, entries, lists, rules, sets int }

func sizesOf(s *Snapshot) arraySizes {
	return arraySizes{s.npods, len(s.ports), len(s.entries), len(s.lists), len(s.rules), len(s.sets)}
}

// within reports whether every array is at most twice its base length plus a floor that keeps
// small snapshots from compiling everything every few changes.
func (a arraySizes) within(base arraySizes) bool {
	const floor = 4096
	ok := func(n, b int) bool { return n <= 2*b+floor }
	return ok(a.pods, base.pods) && ok(a.ports, base.ports) && ok(a.entries, base.entries) &&
		ok(a.lists, base.lists) && ok(a.rules, base.rules) && ok(a.sets, base.sets)
}

func (b *Builder) compileAll(opt Options) (*Snapshot, error) {
	b.compiles++
	clear(b.changed)
	clear(b.changedNPs)
	clear(b.changedNSs)
	b.full = false
	b.snap, b.c = nil, nil
	c, err := compileWith(b.State(), opt, true)
	if c == nil {
		return nil, err
	}
	s := c.s
	b.snap, b.c = s, c
	b.base = sizesOf(s)
	b.ids = make(map[PodRef]podID, s.npods)
	b.shared = make(map[netip.Addr][]podID)
	for id, p := range s.livePods {
		b.ids[p.ref] = id
		for _, a := range p.ips {
			if o := s.lookup(a); o != id { // another claimant: the owner is one too
				l := b.shared[a]
				if l == nil {
					l = []podID{o}
				}
				b.shared[a] = append(l, id)
			}
		}
	}
	b.singleNS = make(map[string][]int32)
	b.multiNS = nil
	b.indexSets(0)
	b.nsPolicies = make(map[string][]int32)
	b.polIDs = make(map[PodRef]int32, len(c.selected))
	b.invalid = make(map[PodRef]PolicyError)
	if ce, ok := c.err.(*CompileError); ok {
		for _, pe := range ce.Policies {
			ns, name, _ := strings.Cut(pe.Policy, "/")
			b.invalid[PodRef{Namespace: ns, Name: name}] = pe
		}
	}
	for i := range c.selected {
		// Compile takes the policies in (namespace, name) order: index order is name order.
		ref := c.selected[i].ref
		b.nsPolicies[ref.Namespace] = append(b.nsPolicies[ref.Namespace], int32(i))
		b.polIDs[ref] = int32(i)
	}
	return s, err
}

// indexSets indexes the peer sets from index from on by the namespaces they draw from.
func (b *Builder) indexSets(from int) {
	for i, d := range b.c.setDefs[from:] {
		i += from
		// Namespaces do not change between full compiles, so a set's namespaces are fixed and
		// a pod change need only visit the sets that draw from its namespace.
		if len(d.nss) > indexedNamespaces {
			b.multiNS = append(b.multiNS, int32(i))
			continue
		}
		for _, ns := range d.nss {
			b.singleNS[ns] = append(b.singleNS[ns], int32(i))
		}
	}
}

// indexedNamespaces bounds the namespaces a peer set is indexed under for pod changes; a set
// drawing from more is checked on every pod change instead.
const indexedNamespaces = 8

// patcher applies changes to a copy of the last snapshot, copying each page, address shard
// and peer set the first time it writes to it, so that the last snapshot never changes.
type patcher struct {
	b        *Builder
	c        *compiler
	s        *Snapshot
	hotPages map[int]bool
	podPages map[int]bool
	shards4  [addrShards]bool
	shards6  [addrShards]bool
	sets     map[int32]bool
	touched  touched // addresses whose flows may change verdict (changes.go)
}

// patch builds the next snapshot from the last one and the changed objects; false when a
// change needs a full compile (see Builder). Then the Builder's patch state is spent: the
// caller compiles everything, which rebuilds it.
func (b *Builder) patch(opt Options) (*Snapshot, bool) {
	old := b.snap
	s := new(Snapshot)
	*s = *old
	s.opt = opt
	s.serial = serials.Add(1)
	s.hot = slices.Clone(old.hot)
	s.pods = slices.Clone(old.pods)
	s.sets = slices.Clone(old.sets)
	p := &patcher{b: b, c: b.c, s: s, hotPages: map[int]bool{}, podPages: map[int]bool{}, sets: map[int32]bool{}, touched: touched{}}
	b.c.s = s // the compiler's rules, sets, lists, entries and ports appends go to the new snapshot
	// Namespaces first: policies resolve new peer selectors against them. Then policies, on
	// the pods as they were; the changed pods then take their isolation from the policies as
	// they are now.
	if len(b.changedNSs) > 0 {
		for name := range b.changedNSs {
			p.namespace(name)
		}
		b.singleNS, b.multiNS = make(map[string][]int32), nil
		b.indexSets(0)
	}
	sets := len(b.c.setDefs)
	for ref := range b.changedNPs {
		if !p.policy(ref) {
			b.c = nil
			return nil, false
		}
	}
	b.indexSets(sets)
	for ref := range b.changed {
		if !p.pod(ref) {
			b.c = nil
			return nil, false
		}
	}
	s.stats.Pods = s.npods - s.dead
	s.stats.PeerSets = len(s.sets)
	s.stats.Invalid = len(b.invalid)
	b.c.err = b.compileError()
	p.touched.record(s, old)
	return s, true
}

// policy applies the change of one policy: its old version isolates nobody any more, its new
// one is compiled under a new index (lists of policy indexes, shared between pods, then never
// mean two different things), and the local pods of its namespace either selects are isolated
// again.
func (p *patcher) policy(ref PodRef) bool {
	b, c, s := p.b, p.c, p.s
	np := b.objs.Policy(ref)
	var sels []labels.Selector
	if oi, had := b.polIDs[ref]; had {
		sels = append(sels, c.selected[oi].sel)
		b.nsPolicies[ref.Namespace] = slices.DeleteFunc(slices.Clone(b.nsPolicies[ref.Namespace]), func(i int32) bool { return i == oi })
		delete(b.polIDs, ref)
		delete(b.invalid, ref)
		old := &s.policies[oi]
		s.stats.Policies--
		s.stats.Rules -= len(old.ingress) + len(old.egress)
	}
	if np != nil {
		names := len(c.portIDs)
		cp, err := c.compilePolicy(np)
		if err != nil {
			if !s.opt.IsolateInvalid {
				return false // no snapshot: the full compile reports every broken policy
			}
			err.Policy = ref.String()
			b.invalid[ref] = *err
			cp = isolating(np)
		}
		if len(c.portIDs) != names {
			p.portNames(names)
		}
		pi := int32(len(s.policies))
		s.policies = append(s.policies, cpolicy{name: ref.String(), ingress: cp.ingRules, egress: cp.egRules})
		at := &s.policies[pi]
		at.ingressAt, at.egressAt = c.layOut(cp.ingRules), c.layOut(cp.egRules)
		c.selected = append(c.selected, policySel{ref: ref, sel: cp.sel, ing: cp.ing, eg: cp.eg})
		list := b.nsPolicies[ref.Namespace]
		i, _ := slices.BinarySearchFunc(list, ref, func(q int32, r PodRef) int { return c.selected[q].ref.Compare(r) })
		b.nsPolicies[ref.Namespace] = slices.Insert(slices.Clone(list), i, pi)
		b.polIDs[ref] = pi
		s.stats.Policies++
		s.stats.Rules += len(cp.ingRules) + len(cp.egRules)
		sels = append(sels, cp.sel)
	}
	for _, id := range c.nsPods[ref.Namespace] {
		if !s.pod(id).local {
			continue
		}
		for _, sel := range sels {
			if sel.Matches(c.labels[id]) {
				p.isolate(id)
				break
			}
		}
	}
	return true
}

// portNames lays out again the named ports of the pods that have a port of a name policies
// use from now on (names from index from on): a pod's hot entry holds only the names some
// policy uses. No verdict of another policy changes, since none names them, and the new
// policy's own pods are isolated again, which records their addresses.
func (p *patcher) portNames(from int) {
	c, s := p.c, p.s
	// A set: one policy may bring thousands of names (MaxPorts), and every pod's ports are
	// looked up.
	fresh := make(map[string]bool, len(s.names)-from)
	for _, name := range s.names[from:] {
		fresh[name] = true
	}
	for i, ports := range c.ports { // a dead pod has none
		id := podID(i)
		for _, cp := range ports {
			if fresh[cp.name] {
				p.writablePod(id)
				p.writableHot(id)
				c.layOutPod(id)
				break
			}
		}
	}
}

// compileError is the *CompileError of the policies that do not compile, in (namespace, name)
// order as Compile lists them; nil when every one does.
func (b *Builder) compileError() error {
	if len(b.invalid) == 0 {
		return nil
	}
	ce := &CompileError{}
	for _, ref := range slices.SortedFunc(maps.Keys(b.invalid), PodRef.Compare) {
		ce.Policies = append(ce.Policies, b.invalid[ref])
	}
	return ce
}

// namespace applies the change of one namespace: its labels, and the membership of its pods in
// the peer sets whose namespace selector matches it now and did not before, or the reverse.
func (p *patcher) namespace(name string) {
	b, c, s := p.b, p.c, p.s
	obj := b.objs.Namespace(name)
	_, known := c.nsLabels[name]
	var l labels.Set
	present := obj != nil || len(c.nsPods[name]) > 0
	switch {
	case obj != nil:
		l = namespaceLabels(name, obj.Labels)
	case present:
		l = namespaceLabels(name, nil) // its pods keep it, named only
	}
	i, _ := slices.BinarySearch(c.nsNames, name)
	switch {
	case present && !known:
		c.nsNames = slices.Insert(c.nsNames, i, name)
	case !present && known:
		c.nsNames = slices.Delete(c.nsNames, i, i+1)
		delete(c.nsLabels, name)
	}
	if present {
		c.nsLabels[name] = l
	}
	clear(c.nsCache) // selections of namespaces made before
	s.stats.Namespaces = len(c.nsLabels)
	for si := range c.setDefs {
		d := &c.setDefs[si]
		if d.ns == nil {
			continue // the policy's own namespace, whatever its labels
		}
		j, was := slices.BinarySearch(d.nss, name)
		if now := present && d.ns.Matches(l); now == was {
			continue
		} else if now {
			d.nss = slices.Insert(slices.Clone(d.nss), j, name)
		} else {
			d.nss = slices.Delete(slices.Clone(d.nss), j, j+1)
		}
		for _, id := range c.nsPods[name] {
			p.member(int32(si), id, true, true)
		}
	}
}

// isolate recomputes the isolation of live pod id from its namespace's policies (none when it
// is remote).
func (p *patcher) isolate(id podID) {
	b, c := p.b, p.c
	cp := p.writablePod(id)
	p.writableHot(id)
	p.touched.add(cp.ips)
	cp.ingressBy, cp.egressBy = nil, nil
	for _, pi := range b.nsPolicies[cp.ref.Namespace] {
		if !cp.local {
			break // its own node judges it
		}
		if ps := &c.selected[pi]; ps.sel.Matches(c.labels[id]) {
			if ps.ing {
				cp.ingressBy = append(cp.ingressBy, pi)
			}
			if ps.eg {
				cp.egressBy = append(cp.egressBy, pi)
			}
		}
	}
	c.layOutPod(id)
}

func (p *patcher) pod(ref PodRef) bool {
	b, c, s := p.b, p.c, p.s
	obj := b.objs.Pod(ref)
	in := obj != nil && Participates(obj)
	if _, known := c.nsLabels[ref.Namespace]; in && !known {
		return false
	}
	id, had := b.ids[ref]
	if !had && !in {
		return true
	}
	var oldIPs []netip.Addr
	if had {
		old := s.pod(id)
		oldIPs = old.ips
		if old.local {
			s.stats.LocalPods--
		}
		c.unindex(id, ref.Namespace)
	} else {
		id = p.appendPod()
		b.ids[ref] = id
	}
	cp := p.writablePod(id)
	if in {
		local := s.opt.Node == "" || obj.Spec.NodeName == s.opt.Node
		*cp = cpod{ref: ref, node: obj.Spec.NodeName, local: local, ips: PodAddrs(obj)}
		c.labels[id] = obj.Labels
		c.ports[id] = slices.Collect(namedContainerPorts(obj))
		c.claims[id] = addressClaim(obj, local)
		c.index(id, ref.Namespace)
		if local {
			s.stats.LocalPods++
		}
		p.isolate(id)
	} else {
		*cp = cpod{ref: ref, dead: true}
		c.labels[id], c.ports[id], c.claims[id] = nil, nil, 0
		delete(b.ids, ref)
		s.dead++
		p.writableHot(id)
		c.layOutPod(id)
	}

	p.touched.add(oldIPs)
	p.touched.add(cp.ips)
	for _, a := range oldIPs {
		if !slices.Contains(cp.ips, a) {
			p.claim(a, id, false)
		}
	}
	for _, a := range cp.ips {
		p.claim(a, id, true) // again when it listed it before: its claim may rank otherwise now
	}

	for _, si := range b.singleNS[ref.Namespace] {
		p.member(si, id, had, in)
	}
	for _, si := range b.multiNS {
		p.member(si, id, had, in)
	}
	return true
}

// member brings pod id's membership of peer set si up to date.
func (p *patcher) member(si int32, id podID, had, in bool) {
	c, s := p.c, p.s
	now := in && c.setDefs[si].has(s.pod(id).ref.Namespace, c.labels[id])
	if was := had && s.sets[si].contains(id); now == was {
		return
	}
	p.touched.add(s.pod(id).ips)
	set := &s.sets[si]
	if !p.sets[si] {
		p.sets[si] = true
		*set = podSet{list: slices.Clone(set.list), bits: slices.Clone(set.bits)}
	}
	if set.bits != nil {
		w := int(id >> 6)
		if w >= len(set.bits) {
			set.bits = append(set.bits, make([]uint64, w+1-len(set.bits))...)
		}
		if now {
			set.bits[w] |= 1 << (uint(id) & 63)
		} else {
			set.bits[w] &^= 1 << (uint(id) & 63)
		}
		return
	}
	i, _ := slices.BinarySearch(set.list, id)
	if now {
		set.list = slices.Insert(set.list, i, id)
	} else {
		set.list = slices.Delete(set.list, i, i+1)
	}
}

// claim records that pod id lists address a (in) or no longer does, and gives a to the
// claimant that ranks first.
func (p *patcher) claim(a netip.Addr, id podID, in bool) {
	b := p.b
	l, multi := b.shared[a]
	if !multi {
		l = nil
		if o := p.s.lookup(a); o.isPod() {
			l = []podID{o}
		}
	}
	l = slices.DeleteFunc(l, func(q podID) bool { return q == id })
	if in {
		l = append(l, id)
	}
	if len(l) > 1 {
		b.shared[a] = l
	} else {
		delete(b.shared, a)
	}
	p.own(a, l)
}

// own gives address a to the claimant addressClaim ranks first, as Compile does: the lowest
// claim, ties to the first pod in (namespace, name) order.
func (p *patcher) own(a netip.Addr, claimants []podID) {
	c, s := p.c, p.s
	best := noPod
	for _, q := range claimants {
		if !best.isPod() || c.claims[q] < c.claims[best] ||
			(c.claims[q] == c.claims[best] && s.pod(q).ref.Compare(s.pod(best).ref) < 0) {
			best = q
		}
	}
	if a.Is4() {
		k := a.As4()[3] & s.shardMask
		if !p.shards4[k] {
			p.shards4[k] = true
			s.by4[k] = maps.Clone(s.by4[k])
		}
	} else {
		k := a.As16()[15] & s.shardMask
		if !p.shards6[k] {
			p.shards6[k] = true
			s.by6[k] = maps.Clone(s.by6[k])
		}
	}
	s.setOwner(a, best)
}

// appendPod allocates the next pod id. Its page entries are appended past the previous
// snapshot's length, which that snapshot never reads.
func (p *patcher) appendPod() podID {
	s, c := p.s, p.c
	id := podID(s.npods)
	pg := int(id >> pageBits)
	if pg == len(s.hot) {
		s.hot = append(s.hot, make([]podHot, 0, pageSize))
		s.pods = append(s.pods, make([]cpod, 0, pageSize))
		p.hotPages[pg], p.podPages[pg] = true, true
	}
	s.hot[pg] = append(s.hot[pg], podHot{})
	s.pods[pg] = append(s.pods[pg], cpod{})
	s.npods++
	c.labels = append(c.labels, nil)
	c.ports = append(c.ports, nil)
	c.claims = append(c.claims, 0)
	return id
}

func (p *patcher) writablePod(id podID) *cpod {
	if pg := int(id >> pageBits); !p.podPages[pg] {
		p.podPages[pg] = true
		p.s.pods[pg] = slices.Clone(p.s.pods[pg])
	}
	return p.s.pod(id)
}

func (p *patcher) writableHot(id podID) *podHot {
	if pg := int(id >> pageBits); !p.hotPages[pg] {
		p.hotPages[pg] = true
		p.s.hot[pg] = slices.Clone(p.s.hot[pg])
	}
	return p.s.hotOf(id)
}

// index adds live pod id to the compiler's namespace and label indexes, which a policy patch
// resolves new peer selectors from; unindex removes it. Both keep the lists ascending.
func (c *compiler) index(id podID, ns string) {
	c.nsPods[ns] = insertID(c.nsPods[ns], id)
	for k, v := range c.labels[id] {
		vals := c.byLabel[k]
		if vals == nil {
			vals = make(map[string][]podID)
			c.byLabel[k] = vals
		}
		vals[v] = insertID(vals[v], id)
	}
}

func (c *compiler) unindex(id podID, ns string) {
	c.nsPods[ns] = deleteID(c.nsPods[ns], id)
	for k, v := range c.labels[id] {
		if vals := c.byLabel[k]; vals != nil {
			if l := deleteID(vals[v], id); len(l) > 0 {
				vals[v] = l
			} else {
				delete(vals, v)
			}
		}
	}
}

func insertID(l []podID, id podID) []podID {
	i, found := slices.BinarySearch(l, id)
	if found {
		return l
	}
	return slices.Insert(l, i, id)
}

func deleteID(l []podID, id podID) []podID {
	if i, found := slices.BinarySearch(l, id); found {
		return slices.Delete(l, i, i+1)
	}
	return l
}
