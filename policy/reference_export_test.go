package policy

import (
	"net/netip"
	"slices"
)

// RefOwner exposes the reference's idea of which pod holds an address to the external tests,
// so Snapshot.Pod and IsLocal can be checked against it.
func RefOwner(st *State, opt Options, addr netip.Addr) (ref PodRef, local, ok bool) {
	p := refOwner(st, opt, addr)
	if p == nil {
		return PodRef{}, false, false
	}
	return PodRef{Namespace: p.Namespace, Name: p.Name}, refLocal(p, opt), true
}

// RefSide is one direction as the reference judges it.
type RefSide struct {
	Judged    bool
	Isolating []string
	Matched   []RuleRef // Peer and Port are -1: only policy, direction and rule are compared
}

// RefSides exposes the reference's per-direction findings, to check Explain in detail.
func RefSides(st *State, opt Options, f Flow) (egress, ingress RefSide) {
	e, i := referenceSides(st, opt, f)
	return RefSide{e.judged, e.isolating, e.matched}, RefSide{i.judged, i.isolating, i.matched}
}

// RefLocalPodIPs lists, as the API documents LocalPodIPs, every address whose owner (by the
// reference's rule) is a local pod.
func RefLocalPodIPs(st *State, opt Options) []netip.Addr {
	var out []netip.Addr
	for i := range st.Pods {
		p := &st.Pods[i]
		if !refTakesPart(p) || !refLocal(p, opt) {
			continue
		}
		var raw []string
		if len(p.Status.PodIPs) > 0 {
			for _, ip := range p.Status.PodIPs {
				raw = append(raw, ip.IP)
			}
		} else {
			raw = append(raw, p.Status.PodIP)
		}
		for _, s := range raw {
			if a, err := netip.ParseAddr(s); err == nil && refOwner(st, opt, a) == p {
				out = append(out, a)
			}
		}
	}
	return out
}

// RefPods lists the participating pods in (namespace, name) order with their addresses as the
// reference reads them, and whether each is local.
func RefPods(st *State, opt Options) (refs []PodRef, ips [][]netip.Addr, local []bool) {
	idx := make([]int, 0, len(st.Pods))
	for i := range st.Pods {
		idx = append(idx, i)
	}
	slices.SortFunc(idx, func(a, b int) int {
		if refPodLess(&st.Pods[a], &st.Pods[b]) {
			return -1
		}
		if refPodLess(&st.Pods[b], &st.Pods[a]) {
			return 1
		}
		return 0
	})
	for _, i := range idx {
		p := &st.Pods[i]
		if !refTakesPart(p) {
			continue
		}
		var raw []string
		if len(p.Status.PodIPs) > 0 {
			for _, ip := range p.Status.PodIPs {
				raw = append(raw, ip.IP)
			}
		} else {
			raw = append(raw, p.Status.PodIP)
		}
		var addrs []netip.Addr
		for _, s := range raw {
			if a, err := netip.ParseAddr(s); err == nil {
				addrs = append(addrs, a)
			}
		}
		if len(addrs) == 0 {
			continue
		}
		refs = append(refs, PodRef{Namespace: p.Namespace, Name: p.Name})
		ips = append(ips, addrs)
		local = append(local, refLocal(p, opt))
	}
	return refs, ips, local
}
