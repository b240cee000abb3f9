package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Level is how much a lint finding matters. Warnings are likely mistakes or gaps in the seed's
// best practices; infos are worth knowing but often deliberate.
type Level string

const (
	LevelWarning Level = "warning"
	LevelInfo    Level = "info"
)

// Lint check names (Finding.Check).
const (
	CheckDefaultDenyIngress  = "default-deny-ingress"
	CheckDefaultDenyEgress   = "default-deny-egress"
	CheckDNSEgress           = "dns-egress"
	CheckSelectsNothing      = "policy-selects-nothing"
	CheckPeerMatchesNothing  = "peer-matches-nothing"
	CheckNamedPortUnresolved = "named-port-unresolved"
	CheckShadowedRule        = "shadowed-rule"
	CheckNoPods              = "no-pods"
)

// Finding is one lint result. Policy is the policy's name (several, comma-separated, when a
// finding is about what a set of policies does together; empty for a namespace-wide finding).
type Finding struct {
	Level     Level  `json:"level"`
	Policy    string `json:"policy,omitempty"`
	Namespace string `json:"namespace"`
	Check     string `json:"check"`
	Message   string `json:"message"`
}

func (f Finding) String() string {
	where := f.Namespace
	if f.Policy != "" {
		where += "/" + f.Policy
	}
	return fmt.Sprintf("%s: %s: %s: %s", f.Level, where, f.Check, f.Message)
}

// systemNamespaces are left out of the default-deny check: their pods belong to the platform,
// whose own manifests decide their isolation.
var systemNamespaces = map[string]bool{"kube-system": true, "kube-public": true, "kube-node-lease": true}

// Lint checks st against the best practices of the seed guide ("start with deny-all, then
// allow specific traffic", "allow DNS") and for policies that cannot do what they look like:
//
//   - default-deny-ingress / default-deny-egress: a namespace with pods but no policy selecting
//     all of its pods (podSelector: {}) for that direction, so new pods start unprotected
//     (kube-system, kube-public and kube-node-lease are skipped);
//   - dns-egress: pods isolated for egress that may not send to port 53 over UDP (warning) or
//     TCP (info), so name resolution fails;
//   - policy-selects-nothing: a podSelector that matches no pod in the namespace;
//   - peer-matches-nothing: a from/to peer (not an ipBlock) that matches no pod;
//   - named-port-unresolved: a named port that is no container port (with that protocol) of
//     any pod the rule could reach, so it matches nothing;
//   - shadowed-rule: a rule whose every peer and port another rule of the same policy and
//     direction already allows.
//
// The checks that need pods run only when st has some; a state of policies alone gets a note
// and per-policy versions of the rest. st should be defaulted (LoadFile does it), but Lint does
// not depend on it and never modifies st. Findings are sorted by namespace, policy and check.
func Lint(st *State) []Finding {
	l := newLinter(st)
	l.defaultDeny()
	l.dns()
	if len(l.pods) > 0 {
		l.selection()
		l.peersAndNamedPorts()
	} else {
		l.add(Finding{Level: LevelInfo, Check: CheckNoPods,
			Message: "the state has no running pods with IPs, so the checks that need pods (policy-selects-nothing, peer-matches-nothing, named-port-unresolved) were skipped and dns-egress looked at policies only; lint a dump with pods (kubectl get pods,namespaces,networkpolicies -A -o yaml) for full results"})
	}
	l.shadowing()
	slices.SortStableFunc(l.out, func(a, b Finding) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Policy, b.Policy), cmp.Compare(a.Check, b.Check))
	})
	return l.out
}

type linter struct {
	st       *State
	nsLabels map[string]labels.Set
	nsNames  []string
	pods     []*corev1.Pod            // participating pods only
	podsIn   map[string][]*corev1.Pod // namespace -> participating pods
	out      []Finding
}

func newLinter(st *State) *linter {
	l := &linter{st: st, nsLabels: make(map[string]labels.Set), podsIn: make(map[string][]*corev1.Pod)}
	addNS := func(name string, lbl map[string]string) { l.nsLabels[name] = namespaceLabels(name, lbl) }
	for i := range st.Namespaces {
		addNS(st.Namespaces[i].Name, st.Namespaces[i].Labels)
	}
	for i := range st.Pods {
		p := &st.Pods[i]
		if _, ok := l.nsLabels[podNamespace(p)]; !ok {
			addNS(podNamespace(p), nil)
		}
		if Participates(p) {
			l.pods = append(l.pods, p)
			l.podsIn[podNamespace(p)] = append(l.podsIn[podNamespace(p)], p)
		}
	}
	for i := range st.Policies {
		if _, ok := l.nsLabels[policyNamespace(&st.Policies[i])]; !ok {
			addNS(policyNamespace(&st.Policies[i]), nil)
		}
	}
	for name := range l.nsLabels {
		l.nsNames = append(l.nsNames, name)
	}
	slices.Sort(l.nsNames)
	return l
}

func (l *linter) add(f Finding) { l.out = append(l.out, f) }

func podNamespace(p *corev1.Pod) string { return namespaceOf(p.Namespace) }

func policyNamespace(np *networkingv1.NetworkPolicy) string { return namespaceOf(np.Namespace) }

// selector turns a label selector into a labels.Selector; an invalid one (Validate rejects
// it) selects nothing here, which for lint only means fewer findings.
func selector(ls *metav1.LabelSelector) labels.Selector {
	s, err := metav1.LabelSelectorAsSelector(ls)
	if err != nil {
		return labels.Nothing()
	}
	return s
}

func selectorText(ls *metav1.LabelSelector) string {
	if ls == nil || len(ls.MatchLabels) == 0 && len(ls.MatchExpressions) == 0 {
		return "{} (everything)"
	}
	return "{" + metav1.FormatLabelSelector(ls) + "}"
}

func isEmptySelector(ls *metav1.LabelSelector) bool {
	return len(ls.MatchLabels) == 0 && len(ls.MatchExpressions) == 0
}

// selected returns the participating pods np's podSelector picks.
func (l *linter) selected(np *networkingv1.NetworkPolicy) []*corev1.Pod {
	sel := selector(&np.Spec.PodSelector)
	var out []*corev1.Pod
	for _, p := range l.podsIn[policyNamespace(np)] {
		if sel.Matches(labels.Set(p.Labels)) {
			out = append(out, p)
		}
	}
	return out
}

// peerNamespaces are the namespaces a selector peer reaches.
func (l *linter) peerNamespaces(policyNS string, peer *networkingv1.NetworkPolicyPeer) []string {
	if peer.NamespaceSelector == nil {
		return []string{policyNS}
	}
	sel := selector(peer.NamespaceSelector)
	var out []string
	for _, name := range l.nsNames {
		if sel.Matches(l.nsLabels[name]) {
			out = append(out, name)
		}
	}
	return out
}

// peerPods returns the participating pods a peer matches; ipBlock peers match pods by IP, as
// the snapshot does.
func (l *linter) peerPods(policyNS string, peer *networkingv1.NetworkPolicyPeer) []*corev1.Pod {
	var out []*corev1.Pod
	if peer.IPBlock != nil {
		b, err := parseBlock(peer.IPBlock, field.NewPath("ipBlock"))
		if err != nil {
			return nil
		}
		for _, p := range l.pods {
			if slices.ContainsFunc(PodAddrs(p), b.contains) {
				out = append(out, p)
			}
		}
		return out
	}
	podSel := labels.Everything()
	if peer.PodSelector != nil {
		podSel = selector(peer.PodSelector)
	}
	for _, ns := range l.peerNamespaces(policyNS, peer) {
		for _, p := range l.podsIn[ns] {
			if podSel.Matches(labels.Set(p.Labels)) {
				out = append(out, p)
			}
		}
	}
	return out
}

func isolates(np *networkingv1.NetworkPolicy, dir Direction) bool {
	ingress, egress := PolicyTypes(np)
	if dir == Ingress {
		return ingress
	}
	return egress
}

func (l *linter) defaultDeny() {
	for _, ns := range l.nsNames {
		if systemNamespaces[ns] {
			continue
		}
		// A namespace matters when it has pods; in a state without pods, when it has policies.
		n := len(l.podsIn[ns])
		if len(l.pods) == 0 {
			n = 0
			for i := range l.st.Policies {
				if policyNamespace(&l.st.Policies[i]) == ns {
					n++
				}
			}
		}
		if n == 0 {
			continue
		}
		var ingress, egress bool
		for i := range l.st.Policies {
			np := &l.st.Policies[i]
			if policyNamespace(np) != ns || !isEmptySelector(&np.Spec.PodSelector) {
				continue
			}
			ingress = ingress || isolates(np, Ingress)
			egress = egress || isolates(np, Egress)
		}
		what := fmt.Sprintf("namespace %s has %d pod(s)", ns, len(l.podsIn[ns]))
		if len(l.pods) == 0 {
			what = fmt.Sprintf("namespace %s has %d policy(ies)", ns, n)
		}
		if !ingress {
			l.add(Finding{Level: LevelWarning, Namespace: ns, Check: CheckDefaultDenyIngress,
				Message: what + " but no policy that selects every pod for Ingress, so any pod no policy selects (including every new one) accepts traffic from anywhere; " +
					"start with deny-all: add a NetworkPolicy with podSelector: {} and policyTypes: [Ingress], then allow specific traffic"})
		}
		if !egress {
			l.add(Finding{Level: LevelInfo, Namespace: ns, Check: CheckDefaultDenyEgress,
				Message: what + " but no policy that selects every pod for Egress, so pods may connect anywhere; " +
					"to restrict that, add a NetworkPolicy with podSelector: {} and policyTypes: [Egress] together with a DNS allowance (UDP and TCP 53)"})
		}
	}
}

// portAllows reports whether a rule port entry lets (proto, port) through; named ports count
// when some pod in the state has that name for that protocol and number.
func (l *linter) portAllows(pp *networkingv1.NetworkPolicyPort, proto corev1.Protocol, port int32) bool {
	if policyPortProtocol(pp) != proto {
		return false
	}
	switch {
	case pp.Port == nil:
		return true
	case pp.Port.Type == intstr.Int:
		end := pp.Port.IntVal
		if pp.EndPort != nil {
			end = *pp.EndPort
		}
		return pp.Port.IntVal <= port && port <= end
	}
	return slices.ContainsFunc(l.pods, func(p *corev1.Pod) bool {
		return namesPort(p, pp.Port.StrVal, proto, func(n uint16) bool { return int32(n) == port })
	})
}

// namesPort reports whether p has a container port called name for proto whose number want
// accepts, as the compiled snapshot resolves named ports.
func namesPort(p *corev1.Pod, name string, proto corev1.Protocol, want func(uint16) bool) bool {
	pr, ok := ProtocolFromK8s(proto)
	if !ok {
		return false
	}
	for cp := range namedContainerPorts(p) {
		if cp.name == name && cp.proto == pr && want(cp.port) {
			return true
		}
	}
	return false
}

// egressAllows reports whether any egress rule of the policies lets (proto, port) out to some
// peer. Where the peers lead is not checked: DNS may live in-cluster or outside.
func (l *linter) egressAllows(pols []*networkingv1.NetworkPolicy, proto corev1.Protocol, port int32) bool {
	for _, np := range pols {
		for _, r := range np.Spec.Egress {
			if len(r.Ports) == 0 {
				return true
			}
			for i := range r.Ports {
				if l.portAllows(&r.Ports[i], proto, port) {
					return true
				}
			}
		}
	}
	return false
}

func (l *linter) dns() {
	type group struct {
		ns       string
		policies []*networkingv1.NetworkPolicy
		pods     []string
	}
	var groups []*group
	byKey := make(map[string]*group)
	addGroup := func(ns string, pols []*networkingv1.NetworkPolicy, pod string) {
		names := make([]string, len(pols))
		for i, np := range pols {
			names[i] = np.Name
		}
		key := ns + "\x00" + strings.Join(names, ",")
		g := byKey[key]
		if g == nil {
			g = &group{ns: ns, policies: pols}
			byKey[key] = g
			groups = append(groups, g)
		}
		if pod != "" {
			g.pods = append(g.pods, pod)
		}
	}
	if len(l.pods) > 0 {
		for _, p := range l.pods {
			var pols []*networkingv1.NetworkPolicy
			for i := range l.st.Policies {
				np := &l.st.Policies[i]
				if policyNamespace(np) == podNamespace(p) && isolates(np, Egress) &&
					selector(&np.Spec.PodSelector).Matches(labels.Set(p.Labels)) {
					pols = append(pols, np)
				}
			}
			if len(pols) > 0 {
				addGroup(podNamespace(p), pols, podNamespace(p)+"/"+p.Name)
			}
		}
	} else {
		// Without pods, judge each egress policy together with the namespace's select-all ones,
		// which apply to whatever it selects.
		for i := range l.st.Policies {
			np := &l.st.Policies[i]
			if !isolates(np, Egress) {
				continue
			}
			pols := []*networkingv1.NetworkPolicy{np}
			for j := range l.st.Policies {
				other := &l.st.Policies[j]
				if j != i && policyNamespace(other) == policyNamespace(np) && isolates(other, Egress) && isEmptySelector(&other.Spec.PodSelector) {
					pols = append(pols, other)
				}
			}
			slices.SortFunc(pols, func(a, b *networkingv1.NetworkPolicy) int { return cmp.Compare(a.Name, b.Name) })
			addGroup(policyNamespace(np), pols, "")
		}
	}
	for _, g := range groups {
		names := make([]string, len(g.policies))
		for i, np := range g.policies {
			names[i] = np.Name
		}
		isolation := fmt.Sprintf("the pods selected by %s are isolated for egress and", strings.Join(names, ", "))
		if len(g.pods) > 0 {
			isolation = fmt.Sprintf("pod(s) %s, isolated for egress by %s,", listSome(g.pods, 3), strings.Join(names, ", "))
		}
		switch {
		case !l.egressAllows(g.policies, corev1.ProtocolUDP, 53):
			l.add(Finding{Level: LevelWarning, Namespace: g.ns, Policy: strings.Join(names, ", "), Check: CheckDNSEgress,
				Message: isolation + " may not send to UDP port 53, so DNS lookups fail; add an egress rule to the cluster DNS (e.g. namespaceSelector: {} with podSelector k8s-app: kube-dns) for port 53 over UDP and TCP"})
		case !l.egressAllows(g.policies, corev1.ProtocolTCP, 53):
			l.add(Finding{Level: LevelInfo, Namespace: g.ns, Policy: strings.Join(names, ", "), Check: CheckDNSEgress,
				Message: isolation + " may send DNS over UDP but not TCP port 53, which large answers and some resolvers need; add protocol: TCP, port: 53 next to the UDP entry"})
		}
	}
}

func anyPort(uint16) bool { return true }

func listSome(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return strings.Join(items[:n], ", ") + " and " + strconv.Itoa(len(items)-n) + " more"
}

func (l *linter) selection() {
	for i := range l.st.Policies {
		np := &l.st.Policies[i]
		if len(l.selected(np)) > 0 {
			continue
		}
		ns := policyNamespace(np)
		l.add(Finding{Level: LevelWarning, Namespace: ns, Policy: np.Name, Check: CheckSelectsNothing,
			Message: fmt.Sprintf("spec.podSelector %s matches none of the %d pod(s) in namespace %s, so the policy has no effect; fix the selector or the pods' labels (kubectl get pods -n %s --show-labels), or delete the policy",
				selectorText(&np.Spec.PodSelector), len(l.podsIn[ns]), ns, ns)})
	}
}

type ruleView struct {
	dir   Direction
	index int
	peers []networkingv1.NetworkPolicyPeer
	ports []networkingv1.NetworkPolicyPort
}

func (r ruleView) path() string { return fmt.Sprintf("spec.%s[%d]", r.dir.specField(), r.index) }

func rulesOf(np *networkingv1.NetworkPolicy) []ruleView {
	var out []ruleView
	for i, r := range np.Spec.Ingress {
		out = append(out, ruleView{dir: Ingress, index: i, peers: r.From, ports: r.Ports})
	}
	for i, r := range np.Spec.Egress {
		out = append(out, ruleView{dir: Egress, index: i, peers: r.To, ports: r.Ports})
	}
	return out
}

func (l *linter) peersAndNamedPorts() {
	for i := range l.st.Policies {
		np := &l.st.Policies[i]
		ns := policyNamespace(np)
		for _, r := range rulesOf(np) {
			// Pods this rule's traffic can reach: the selected pods for ingress, the peers for
			// egress (all pods when the rule has no peers).
			var dest []*corev1.Pod
			if r.dir == Ingress {
				dest = l.selected(np)
			} else if len(r.peers) == 0 {
				dest = l.pods
			}
			for j := range r.peers {
				peer := &r.peers[j]
				matched := l.peerPods(ns, peer)
				if r.dir == Egress {
					dest = append(dest, matched...)
				}
				if peer.IPBlock != nil || len(matched) > 0 {
					continue
				}
				why := "no pod matches it"
				if peer.NamespaceSelector != nil && len(l.peerNamespaces(ns, peer)) == 0 {
					why = fmt.Sprintf("namespaceSelector %s matches no namespace", selectorText(peer.NamespaceSelector))
				} else if peer.PodSelector != nil {
					why = fmt.Sprintf("podSelector %s matches no pod in the namespace(s) it covers", selectorText(peer.PodSelector))
				}
				l.add(Finding{Level: LevelWarning, Namespace: ns, Policy: np.Name, Check: CheckPeerMatchesNothing,
					Message: fmt.Sprintf("%s.%s[%d] allows nothing: %s; check the labels (namespaces carry %s=<name>), or remove the peer",
						r.path(), r.dir.peerField(), j, why, corev1.LabelMetadataName)})
			}
			for j := range r.ports {
				pp := &r.ports[j]
				if pp.Port == nil || pp.Port.Type != intstr.String {
					continue
				}
				proto := policyPortProtocol(pp)
				if r.dir == Ingress && len(dest) == 0 {
					continue // policy-selects-nothing says it already
				}
				if slices.ContainsFunc(dest, func(p *corev1.Pod) bool { return namesPort(p, pp.Port.StrVal, proto, anyPort) }) {
					continue
				}
				target := "the pods this policy selects"
				if r.dir == Egress {
					target = "the pods this rule may reach"
				}
				l.add(Finding{Level: LevelWarning, Namespace: ns, Policy: np.Name, Check: CheckNamedPortUnresolved,
					Message: fmt.Sprintf("%s.ports[%d]: named port %q (%s) is not a container port of any of %s, so it matches nothing; name the container port (spec.containers[].ports[].name) or use the port number",
						r.path(), j, pp.Port.StrVal, proto, target)})
			}
		}
	}
}

func (l *linter) shadowing() {
	for i := range l.st.Policies {
		np := &l.st.Policies[i]
		ns := policyNamespace(np)
		rules := rulesOf(np)
		for j, rj := range rules {
			for k, rk := range rules {
				if k == j || rk.dir != rj.dir || !ruleCovers(ns, rk, rj) {
					continue
				}
				// Two identical rules cover each other; report only the later one.
				if ruleCovers(ns, rj, rk) && k > j {
					continue
				}
				l.add(Finding{Level: LevelWarning, Namespace: ns, Policy: np.Name, Check: CheckShadowedRule,
					Message: fmt.Sprintf("%s is shadowed by %s, which already allows every peer and port it does; delete %s, or narrow %s if it is broader than meant",
						rj.path(), rk.path(), rj.path(), rk.path())})
				break
			}
		}
	}
}

// ruleCovers reports whether rule a allows (syntactically, for any cluster) everything rule b
// allows. It errs towards "no": a missed shadow is a missed hint, a false one is noise.
func ruleCovers(ns string, a, b ruleView) bool {
	return peersCover(ns, a.peers, b.peers) && portsCover(a.ports, b.ports)
}

func peersCover(ns string, a, b []networkingv1.NetworkPolicyPeer) bool {
	if len(a) == 0 {
		return true
	}
	if len(b) == 0 {
		return false
	}
	for i := range b {
		if !slices.ContainsFunc(a, func(pa networkingv1.NetworkPolicyPeer) bool { return peerCovers(ns, &pa, &b[i]) }) {
			return false
		}
	}
	return true
}

func peerCovers(ns string, a, b *networkingv1.NetworkPolicyPeer) bool {
	if a.IPBlock != nil || b.IPBlock != nil {
		return a.IPBlock != nil && b.IPBlock != nil && blockCovers(a.IPBlock, b.IPBlock)
	}
	own := &metav1.LabelSelector{MatchLabels: map[string]string{corev1.LabelMetadataName: ns}}
	nsA, nsB := a.NamespaceSelector, b.NamespaceSelector
	if nsA == nil {
		nsA = own
	}
	if nsB == nil {
		nsB = own
	}
	if !(a.NamespaceSelector == nil && b.NamespaceSelector == nil) && !selectorCovers(nsA, nsB) {
		return false
	}
	everything := &metav1.LabelSelector{}
	podA, podB := a.PodSelector, b.PodSelector
	if podA == nil {
		podA = everything
	}
	if podB == nil {
		podB = everything
	}
	return selectorCovers(podA, podB)
}

func blockCovers(a, b *networkingv1.IPBlock) bool {
	ca, errA := netip.ParsePrefix(a.CIDR)
	cb, errB := netip.ParsePrefix(b.CIDR)
	if errA != nil || errB != nil || ca.Addr().Is4() != cb.Addr().Is4() || ca.Bits() > cb.Bits() || !ca.Contains(cb.Addr()) {
		return false
	}
	// Every hole in a that overlaps b must lie inside a hole of b.
	for _, es := range a.Except {
		ea, err := netip.ParsePrefix(es)
		if err != nil {
			return false
		}
		if !ea.Overlaps(cb) {
			continue
		}
		inside := false
		for _, bs := range b.Except {
			eb, err := netip.ParsePrefix(bs)
			if err == nil && eb.Bits() <= ea.Bits() && eb.Contains(ea.Addr()) {
				inside = true
				break
			}
		}
		if !inside {
			return false
		}
	}
	return true
}

type requirement struct {
	key    string
	op     metav1.LabelSelectorOperator
	values []string
}

func requirementsOf(s *metav1.LabelSelector) []requirement {
	var out []requirement
	for k, v := range s.MatchLabels {
		out = append(out, requirement{k, metav1.LabelSelectorOpIn, []string{v}})
	}
	for _, e := range s.MatchExpressions {
		out = append(out, requirement{e.Key, e.Operator, e.Values})
	}
	return out
}

// selectorCovers reports whether every label set b matches, a matches too: each requirement of
// a must follow from one requirement of b.
func selectorCovers(a, b *metav1.LabelSelector) bool {
	rb := requirementsOf(b)
	for _, ra := range requirementsOf(a) {
		if !slices.ContainsFunc(rb, func(r requirement) bool { return implies(r, ra) }) {
			return false
		}
	}
	return true
}

// implies reports whether every label set satisfying b satisfies a.
func implies(b, a requirement) bool {
	if a.key != b.key {
		return false
	}
	subset := func(x, y []string) bool { // x ⊆ y
		for _, v := range x {
			if !slices.Contains(y, v) {
				return false
			}
		}
		return true
	}
	disjoint := func(x, y []string) bool {
		return !slices.ContainsFunc(x, func(v string) bool { return slices.Contains(y, v) })
	}
	switch a.op {
	case metav1.LabelSelectorOpIn:
		return b.op == metav1.LabelSelectorOpIn && subset(b.values, a.values)
	case metav1.LabelSelectorOpNotIn:
		switch b.op {
		case metav1.LabelSelectorOpIn:
			return disjoint(b.values, a.values)
		case metav1.LabelSelectorOpNotIn:
			return subset(a.values, b.values)
		case metav1.LabelSelectorOpDoesNotExist:
			return true
		}
	case metav1.LabelSelectorOpExists:
		return b.op == metav1.LabelSelectorOpIn || b.op == metav1.LabelSelectorOpExists
	case metav1.LabelSelectorOpDoesNotExist:
		return b.op == metav1.LabelSelectorOpDoesNotExist
	}
	return false
}

func portsCover(a, b []networkingv1.NetworkPolicyPort) bool {
	if len(a) == 0 {
		return true
	}
	if len(b) == 0 {
		return false
	}
	for i := range b {
		if !slices.ContainsFunc(a, func(pa networkingv1.NetworkPolicyPort) bool { return portCovers(&pa, &b[i]) }) {
			return false
		}
	}
	return true
}

func portCovers(a, b *networkingv1.NetworkPolicyPort) bool {
	if policyPortProtocol(a) != policyPortProtocol(b) {
		return false
	}
	switch {
	case a.Port == nil:
		return true
	case b.Port == nil:
		return false
	case a.Port.Type == intstr.String || b.Port.Type == intstr.String:
		return a.Port.Type == b.Port.Type && a.Port.StrVal == b.Port.StrVal
	}
	end := func(p *networkingv1.NetworkPolicyPort) int32 {
		if p.EndPort != nil {
			return *p.EndPort
		}
		return p.Port.IntVal
	}
	return a.Port.IntVal <= b.Port.IntVal && end(b) <= end(a)
}
