package policy

import (
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// ReferenceDecide is the literal evaluator: it reads the NetworkPolicy specification sentence by
// sentence and re-derives everything from st on every call (no index, no cache, no compiled
// form). It is deliberately slow and obvious so that tests can hold Compile+Decide against it
// and benchmarks can show what compilation buys. Never use it on a packet path.
//
// It applies the same defaulting as the API server (policyTypes, TCP, the namespace name
// label), so a raw State works, and the same implementation choices as Decide: ipBlock matches
// pod IPs too; egress is judged only for local source pods and ingress only for local
// destination pods; an address several pods claim belongs to one of them by the rule of
// refOwner.
func ReferenceDecide(st *State, opt Options, f Flow) Verdict {
	eg, in := referenceSides(st, opt, f)
	egressIsolated, egressAllowed := len(eg.isolating) > 0, len(eg.matched) > 0
	ingressIsolated, ingressAllowed := len(in.isolating) > 0, len(in.matched) > 0
	switch {
	case egressIsolated && !egressAllowed:
		return Verdict{Allowed: false, Reason: ReasonEgress}
	case ingressIsolated && !ingressAllowed:
		return Verdict{Allowed: false, Reason: ReasonIngress}
	case egressIsolated || ingressIsolated:
		return Verdict{Allowed: true, Reason: ReasonRule}
	}
	return Verdict{Allowed: true, Reason: ReasonUnisolated}
}

// refSideResult is one direction as the reference sees it: whether this node judges it, the
// policies (namespace/name) isolating the pod in this direction, and every rule that admits
// the flow (Peer and Port left at -1: only the rule is identified).
type refSideResult struct {
	judged    bool
	isolating []string
	matched   []RuleRef
}

// referenceSides judges egress at the source and ingress at the destination.
func referenceSides(st *State, opt Options, f Flow) (egress, ingress refSideResult) {
	src := refOwner(st, opt, f.Src)
	dst := refOwner(st, opt, f.Dst)
	if src != nil && refLocal(src, opt) {
		egress = refSide(st, src, networkingv1.PolicyTypeEgress, f.Dst, dst, f)
	}
	if dst != nil && refLocal(dst, opt) {
		ingress = refSide(st, dst, networkingv1.PolicyTypeIngress, f.Src, src, f)
	}
	return egress, ingress
}

// refSide judges one direction for pod: which policies selecting pod have dir among their
// (defaulted) policyTypes, and which of their rules admit the peer (peerAddr, which is peerPod
// when the address belongs to a pod) on f's protocol and port. The destination pod, against
// which named ports resolve, is pod for ingress and peerPod for egress.
func refSide(st *State, pod *corev1.Pod, dir networkingv1.PolicyType, peerAddr netip.Addr, peerPod *corev1.Pod, f Flow) refSideResult {
	res := refSideResult{judged: true}
	dstPod := pod
	if dir == networkingv1.PolicyTypeEgress {
		dstPod = peerPod
	}
	for i := range st.Policies {
		np := &st.Policies[i]
		if np.Namespace != pod.Namespace {
			continue
		}
		if !refSelectorMatches(&np.Spec.PodSelector, pod.Labels) {
			continue
		}
		if !refHasType(np, dir) {
			continue
		}
		name := np.Namespace + "/" + np.Name
		res.isolating = append(res.isolating, name)
		if dir == networkingv1.PolicyTypeIngress {
			for r, rule := range np.Spec.Ingress {
				if refPeersMatch(st, np.Namespace, rule.From, peerAddr, peerPod) && refPortsMatch(rule.Ports, dstPod, f) {
					res.matched = append(res.matched, RuleRef{Policy: name, Direction: Ingress, Rule: r, Peer: -1, Port: -1})
				}
			}
		} else {
			for r, rule := range np.Spec.Egress {
				if refPeersMatch(st, np.Namespace, rule.To, peerAddr, peerPod) && refPortsMatch(rule.Ports, dstPod, f) {
					res.matched = append(res.matched, RuleRef{Policy: name, Direction: Egress, Rule: r, Peer: -1, Port: -1})
				}
			}
		}
	}
	return res
}

// refHasType applies the API server's defaulting of policyTypes when the field is empty: every
// policy affects ingress, and a policy with at least one egress rule also affects egress.
func refHasType(np *networkingv1.NetworkPolicy, dir networkingv1.PolicyType) bool {
	if len(np.Spec.PolicyTypes) == 0 {
		if dir == networkingv1.PolicyTypeIngress {
			return true
		}
		return len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		if t == dir {
			return true
		}
	}
	return false
}

// refPeersMatch: an empty peer list admits every peer; otherwise peers are ORed.
func refPeersMatch(st *State, policyNS string, peers []networkingv1.NetworkPolicyPeer, addr netip.Addr, pod *corev1.Pod) bool {
	if len(peers) == 0 {
		return true
	}
	for i := range peers {
		if refPeerMatches(st, policyNS, &peers[i], addr, pod) {
			return true
		}
	}
	return false
}

func refPeerMatches(st *State, policyNS string, peer *networkingv1.NetworkPolicyPeer, addr netip.Addr, pod *corev1.Pod) bool {
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			// The API server rejects this combination; refuse rather than guess.
			return false
		}
		return refIPBlockContains(peer.IPBlock, addr)
	}
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return false // an empty peer is invalid; never read it as "everyone"
	}
	if pod == nil {
		return false // selectors only ever select pods
	}
	if peer.NamespaceSelector == nil {
		if pod.Namespace != policyNS {
			return false
		}
	} else if !refSelectorMatches(peer.NamespaceSelector, refNamespaceLabels(st, pod.Namespace)) {
		return false
	}
	if peer.PodSelector != nil && !refSelectorMatches(peer.PodSelector, pod.Labels) {
		return false
	}
	return true
}

// refIPBlockContains: addr is inside cidr and outside every except. Anything unparsable makes the
// block match nothing.
func refIPBlockContains(b *networkingv1.IPBlock, addr netip.Addr) bool {
	cidr, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return false
	}
	if !cidr.Contains(addr) {
		return false
	}
	for _, e := range b.Except {
		ex, err := netip.ParsePrefix(e)
		if err != nil {
			return false
		}
		if ex.Contains(addr) {
			return false
		}
	}
	return true
}

// refPortsMatch: an empty list admits every port and protocol; otherwise entries are ORed.
func refPortsMatch(ports []networkingv1.NetworkPolicyPort, dstPod *corev1.Pod, f Flow) bool {
	if len(ports) == 0 {
		return true
	}
	for i := range ports {
		if refPortMatches(&ports[i], dstPod, f) {
			return true
		}
	}
	return false
}

func refPortMatches(p *networkingv1.NetworkPolicyPort, dstPod *corev1.Pod, f Flow) bool {
	proto := corev1.ProtocolTCP
	if p.Protocol != nil {
		proto = *p.Protocol
	}
	if refProto(proto) != f.Proto {
		return false
	}
	if p.Port == nil {
		return true // only a protocol: every port of it
	}
	if p.Port.Type == intstr.String { // a named port
		if p.EndPort != nil {
			return false // rejected by the API server; a range needs a numeric start
		}
		if dstPod == nil {
			return false
		}
		// A named port is a port of the pod: of its containers, and of its sidecars (init
		// containers with restartPolicy Always, which serve for the pod's whole life); an
		// ordinary init container has exited before the pod serves anything.
		var serving []corev1.Container
		serving = append(serving, dstPod.Spec.Containers...)
		for _, c := range dstPod.Spec.InitContainers {
			if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
				serving = append(serving, c)
			}
		}
		for _, c := range serving {
			for _, cp := range c.Ports {
				cpProto := cp.Protocol
				if cpProto == "" {
					cpProto = corev1.ProtocolTCP
				}
				if cp.Name == p.Port.StrVal && cpProto == proto && int(f.Port) == int(cp.ContainerPort) {
					return true
				}
			}
		}
		return false
	}
	start := int(p.Port.IntVal)
	if p.EndPort == nil {
		return int(f.Port) == start
	}
	return start <= int(f.Port) && int(f.Port) <= int(*p.EndPort)
}

func refProto(p corev1.Protocol) Protocol {
	switch p {
	case corev1.ProtocolTCP:
		return TCP
	case corev1.ProtocolUDP:
		return UDP
	case corev1.ProtocolSCTP:
		return SCTP
	}
	return 0 // matches no packet protocol we judge
}

// refSelectorMatches evaluates a LabelSelector by the letter: every matchLabels pair and every
// matchExpressions requirement must hold. An unknown operator matches nothing.
func refSelectorMatches(sel *metav1.LabelSelector, labels map[string]string) bool {
	for k, v := range sel.MatchLabels {
		got, ok := labels[k]
		if !ok || got != v {
			return false
		}
	}
	for _, req := range sel.MatchExpressions {
		got, ok := labels[req.Key]
		switch req.Operator {
		case metav1.LabelSelectorOpIn:
			if !ok || !refContains(req.Values, got) {
				return false
			}
		case metav1.LabelSelectorOpNotIn:
			if ok && refContains(req.Values, got) {
				return false
			}
		case metav1.LabelSelectorOpExists:
			if !ok {
				return false
			}
		case metav1.LabelSelectorOpDoesNotExist:
			if ok {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func refContains(vals []string, v string) bool {
	for _, x := range vals {
		if x == v {
			return true
		}
	}
	return false
}

// refNamespaceLabels returns the namespace's labels with kubernetes.io/metadata.name set to its
// name, as the API server guarantees. A namespace the state does not contain still has that one
// label.
func refNamespaceLabels(st *State, name string) map[string]string {
	out := map[string]string{}
	for i := range st.Namespaces {
		if st.Namespaces[i].Name == name {
			for k, v := range st.Namespaces[i].Labels {
				out[k] = v
			}
			break
		}
	}
	out["kubernetes.io/metadata.name"] = name
	return out
}

// refTakesPart: hostNetwork pods share the node's address (their traffic is node traffic),
// finished pods hold no address any more. (An address-less pod never matches an address, so
// refOwner needs no separate check for it.)
func refTakesPart(p *corev1.Pod) bool {
	if p.Spec.HostNetwork {
		return false
	}
	return p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed
}

// refPodHasIP: the pod's addresses are status.podIPs when present, else status.podIP;
// unparsable entries are no address.
func refPodHasIP(p *corev1.Pod, addr netip.Addr) bool {
	if len(p.Status.PodIPs) > 0 {
		for _, ip := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil && a == addr {
				return true
			}
		}
		return false
	}
	a, err := netip.ParseAddr(p.Status.PodIP)
	return err == nil && a == addr
}

// refOwner finds the participating pod that holds addr. When several claim it (a stale status
// during IP reuse, or a terminating pod that still lists an address it gave up), the owner is,
// in this order of preference:
//  1. a pod that is not terminating (no deletionTimestamp): a terminating pod may have released
//     the address already;
//  2. a pod on this node: packets from this node's pod interfaces are its pods', and a remote
//     pod's stale status must not switch a local pod's enforcement off;
//  3. a Running pod, over a Pending or Unknown one;
//  4. the first in (namespace, name) order, so the answer never depends on the order of st.Pods.
func refOwner(st *State, opt Options, addr netip.Addr) *corev1.Pod {
	var best *corev1.Pod
	for i := range st.Pods {
		p := &st.Pods[i]
		if !refTakesPart(p) || !refPodHasIP(p, addr) {
			continue
		}
		if best == nil || refOwnsBefore(p, best, opt) {
			best = p
		}
	}
	return best
}

// refOwnsBefore reports whether a's claim to an address beats b's (see refOwner).
func refOwnsBefore(a, b *corev1.Pod, opt Options) bool {
	aTerm, bTerm := a.DeletionTimestamp != nil, b.DeletionTimestamp != nil
	if aTerm != bTerm {
		return !aTerm
	}
	if aLocal, bLocal := refLocal(a, opt), refLocal(b, opt); aLocal != bLocal {
		return aLocal
	}
	if aRun, bRun := a.Status.Phase == corev1.PodRunning, b.Status.Phase == corev1.PodRunning; aRun != bRun {
		return aRun
	}
	return refPodLess(a, b)
}

func refPodLess(a, b *corev1.Pod) bool {
	if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
		return c < 0
	}
	return a.Name < b.Name
}

func refLocal(p *corev1.Pod, opt Options) bool {
	return opt.Node == "" || p.Spec.NodeName == opt.Node
}
