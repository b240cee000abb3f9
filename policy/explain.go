package policy

import (
	"fmt"
	"iter"
	"net/netip"
	"strconv"
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
	r := s.resolve(f)
	e.Egress = s.side(Egress, &r)
	e.Ingress = s.side(Ingress, &r)
	return e
}

func (s *Snapshot) endpoint(ip netip.Addr) Endpoint {
	ep := Endpoint{IP: ip}
	if i := s.lookup(ip); i.isPod() {
		p := s.pod(i)
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
func (s *Snapshot) side(dir Direction, r *resolved) Side {
	egress := dir == Egress
	peerIP, peer := r.peer(egress)
	selfIP, self := r.peer(!egress)
	role := "destination"
	if egress {
		role = "source"
	}
	word := dir.specField()
	if !self.isPod() {
		return Side{Allowed: true, Why: fmt.Sprintf("the %s %s is not a pod, so no policy restricts its %s", role, selfIP, word)}
	}
	p := s.pod(self)
	if !p.local {
		return Side{Allowed: true, Why: fmt.Sprintf("%s runs on node %q; its %s is enforced there", p.ref, p.node, word)}
	}
	by := p.ingressBy
	if egress {
		by = p.egressBy
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
	peerName := s.Describe(peerIP)
	rules := 0
	for _, ri := range s.rulesOf(by, dir) {
		rules++
		rule := &s.rules[ri]
		ref := RuleRef{Policy: s.policies[rule.policy].name, Direction: dir, Rule: int(rule.index)}
		at := fmt.Sprintf("%s %s rule %d", ref.Policy, word, rule.index)
		port := s.portMatch(rule, r)
		if port == noMatch {
			sd.Unmatched = append(sd.Unmatched, fmt.Sprintf("%s: %s/%d is not among its ports (%s)", at, r.Proto, r.Port, s.portsText(rule)))
			continue
		}
		pe := rule.peerMatch(s, peerIP, peer)
		if pe == noMatch {
			sd.Unmatched = append(sd.Unmatched, fmt.Sprintf("%s: %s matches none of its peers", at, peerName))
			continue
		}
		ref.Peer, ref.Port = int(pe), int(port)
		sd.MatchedBy = append(sd.MatchedBy, ref)
	}
	sd.Allowed = len(sd.MatchedBy) > 0
	policies := strings.Join(sd.IsolatingPolicies, ", ")
	switch {
	case sd.Allowed:
		m := sd.MatchedBy[0]
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s; %s %s rule %d allows %s on %s/%d", p.ref, word, policies, m.Policy, word, m.Rule, peerName, r.Proto, r.Port)
	case rules == 0:
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s, which allow no %s at all", p.ref, word, policies, word)
	default:
		sd.Why = fmt.Sprintf("%s is isolated for %s by %s and no %s rule allows %s on %s/%d", p.ref, word, policies, word, peerName, r.Proto, r.Port)
	}
	return sd
}

// rulesOf yields the rules in direction dir of the policies by, in order.
func (s *Snapshot) rulesOf(by []int32, dir Direction) iter.Seq2[int, ruleID] {
	return func(yield func(int, ruleID) bool) {
		n := 0
		for _, pi := range by {
			for _, ri := range s.policies[pi].rules(dir) {
				if !yield(n, ri) {
					return
				}
				n++
			}
		}
	}
}

// portsText lists r's ports as written.
func (s *Snapshot) portsText(r *crule) string {
	texts := make([]string, len(r.ports))
	for i := range r.ports {
		p := &r.ports[i]
		switch {
		case p.anyNum:
			texts[i] = "all " + p.proto.String() + " ports"
		case p.name != noName:
			texts[i] = s.names[p.name] + "/" + p.proto.String()
		case p.lo == p.hi:
			texts[i] = strconv.Itoa(int(p.lo)) + "/" + p.proto.String()
		default:
			texts[i] = strconv.Itoa(int(p.lo)) + "-" + strconv.Itoa(int(p.hi)) + "/" + p.proto.String()
		}
	}
	return strings.Join(texts, ", ")
}
