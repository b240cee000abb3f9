package policy

import "net/netip"

// RefOwner exposes the reference's idea of which pod holds an address to the external tests,
// so Snapshot.Pod and IsLocal can be checked against it.
func RefOwner(st *State, opt Options, addr netip.Addr) (ref PodRef, local, ok bool) {
	p := refOwner(st, addr)
	if p == nil {
		return PodRef{}, false, false
	}
	return PodRef{Namespace: p.Namespace, Name: p.Name}, refLocal(p, opt), true
}
