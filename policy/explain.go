package policy

import (
	"fmt"
	"net/netip"
	"strings"
)

// Explain is the cold path: it says why Decide answers what it does for f — which policies
// isolate each end, which policy, rule, peer and port allowed the flow, or why each rule of
// the isolating policies did not. Its Allowed and Reason always equal Decide's.
func (s *Snapshot) Explain(f Flow) Explanation {
	f.Src, f.Dst = f.Src.Unmap(), f.Dst.Unmap()
	v := s.Decide(f)
	e := Explanation{
		Allowed:     v.Allowed,
		Reason:      v.Reason.String(),
		Source:      s.endpoint(f.Src),
		Destination: s.endpoint(f.Dst),
		Protocol:    f.Proto.String(),
		Port:        f.Port,
	}
	si, srcPod := s.lookup(f.Src)
	di, dstPod := s.lookup(f.Dst)
	e.Egress = s.side(Egress, f, si, srcPod, di, dstPod)
	e.Ingress = s.side(Ingress, f, di, dstPod, si, srcPod)
	return e
}

func (s *Snapshot) endpoint(ip netip.Addr) Endpoint {
	ep := Endpoint{IP: ip}
	if i, ok := s.lookup(ip); ok {
		p := &s.pods[i]
		ref := p.ref
		ep.Pod, ep.Local, ep.Node = &ref, p.local, p.node
	}
	return ep
}

// Describe names an address for people: "namespace/pod (ip)" or the bare IP.
func (s *Snapshot) Describe(ip netip.Addr) string {
	if ref, ok := s.Pod(ip); ok {
		return ref.String() + " (" + ip.String() + ")"
	}
	return ip.String()
}

// side explains one direction: egress judged at the source (self = source, peer =
// destination) or ingress judged at the destination (self = destination, peer = source).
func (s *Snapshot) side(dir Direction, f Flow, self int32, selfPod bool, peer int32, peerPod bool) Side {
	selfIP, peerIP := f.Src, f.Dst
	role := "source"
	if dir == Ingress {
		selfIP, peerIP = f.Dst, f.Src
		role = "destination"
	}
	word := strings.ToLower(string(dir))
	if !selfPod {
		return Side{Allowed: true, Why: fmt.Sprintf("the %s %s is not a pod, so no policy restricts its %s", role, selfIP, word)}
	}
	p := &s.pods[self]
	if !p.local {
		return Side{Allowed: true, Why: fmt.Sprintf("%s runs on node %q; its %s is enforced there", p.ref, p.node, word)}
	}
	rules, by := p.ingressRules, p.ingressBy
	if dir == Egress {
		rules, by = p.egressRules, p.egressBy
	}
	sd := Side{Enforced: true, Isolated: len(by) > 0}
	if !sd.Isolated {
		sd.Allowed = true
		sd.Why = fmt.Sprintf("no policy selects %s for %s, so all %s is allowed", p.ref, word, word)
		return sd
	}
	for _, pi := range by {
		sd.IsolatingPolicies = append(sd.IsolatingPolicies, s.policies[pi].name)
	}
	// Named ports resolve against the destination pod: the peer for egress, self for ingress.
	dst, dstPod := peer, peerPod
	if dir == Ingress {
		dst, dstPod = self, true
	}
	peerName := s.Describe(peerIP)
	for _, ri := range rules {
		r := &s.rules[ri]
		ref := RuleRef{Policy: s.policies[r.policy].name, Direction: dir, Rule: int(r.index)}
		at := fmt.Sprintf("%s %s rule %d", ref.Policy, word, r.index)
		port := s.portIndex(r, f, dst, dstPod)
		if port < -1 {
			sd.Unmatched = append(sd.Unmatched, fmt.Sprintf("%s: %s/%d is not among its ports (%s)", at, f.Proto, f.Port, r.portsText()))
			continue
		}
		pe := r.peerIndex(s, peerIP, peer, peerPod)
		if pe < -1 {
			sd.Unmatched = append(sd.Unmatched, fmt.Sprintf("%s: %s matches none of its peers", at, peerName))
			continue
		}
		ref.Peer, ref.Port = pe, port
		sd.MatchedBy = append(sd.MatchedBy, ref)
	}
	sd.Allowed = len(sd.MatchedBy) > 0
	policies := strings.Join(sd.IsolatingPolicies, ", ")
	switch {
	case sd.Allowed:
		m := sd.MatchedBy[0]
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s; %s %s rule %d allows %s on %s/%d", p.ref, word, policies, m.Policy, word, m.Rule, peerName, f.Proto, f.Port)
	case len(rules) == 0:
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s, which allow no %s at all", p.ref, word, policies, word)
	default:
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s and no %s rule allows %s on %s/%d", p.ref, word, policies, word, peerName, f.Proto, f.Port)
	}
	return sd
}

func (r *crule) portsText() string {
	return strings.Join(r.portText, ", ")
}
