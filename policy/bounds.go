package policy

import (
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Bounds on one NetworkPolicy. The API server accepts objects up to about 1.5 MB, room for
// over 100,000 ports or 40,000 ipBlocks, and every node compiles every policy: without bounds
// one tenant's object could cost every agent hundreds of megabytes (or seconds of CPU per
// recompile) and crash-loop the DaemonSet, which is fail-open or a node-wide blackout. The
// bounds are far above what policies written by people or generated from allowlists use, and
// a policy beyond them compiles as one that does not compile: the pods it selects stay isolated
// with none of its rules (Options.IsolateInvalid), and the PolicyError names the field where
// the bound was crossed. Counts are over the whole policy, both directions.
const (
	MaxRules         = 1_000  // ingress plus egress rules
	MaxPorts         = 10_000 // ports entries over all rules
	MaxPeers         = 10_000 // from/to entries over all rules
	MaxSelectorPeers = 1_000  // of those, peers with a pod or namespace selector (each may be a pod set as large as the cluster)
	MaxExcepts       = 1_000  // ipBlock except entries over all peers (each may split its block into up to 128 prefixes)
)

// checkSize reports the first field at which np crosses one of the bounds, before anything of
// it is compiled.
func checkSize(np *networkingv1.NetworkPolicy) *PolicyError {
	spec := field.NewPath("spec")
	if n := len(np.Spec.Ingress) + len(np.Spec.Egress); n > MaxRules {
		at := spec.Child("egress").Index(MaxRules - len(np.Spec.Ingress))
		if len(np.Spec.Ingress) > MaxRules {
			at = spec.Child("ingress").Index(MaxRules)
		}
		return fieldError(at, "the policy has %d rules; sluice compiles at most %d (MaxRules) in one policy: merge rules that share peers or ports, or split the policy", n, MaxRules)
	}
	var ports, peers, selectors, excepts int
	check := func(dir Direction, i int, rulePeers []networkingv1.NetworkPolicyPeer, rulePorts []networkingv1.NetworkPolicyPort) *PolicyError {
		rule := spec.Child(dir.specField()).Index(i)
		if ports+len(rulePorts) > MaxPorts {
			return fieldError(rule.Child("ports").Index(MaxPorts-ports), "the policy has more than %d ports in all (MaxPorts): use port ranges (endPort), or split the policy", MaxPorts)
		}
		ports += len(rulePorts)
		if peers+len(rulePeers) > MaxPeers {
			return fieldError(rule.Child(dir.peerField()).Index(MaxPeers-peers), "the policy has more than %d peers in all (MaxPeers): merge ipBlocks into wider CIDRs, or split the policy", MaxPeers)
		}
		peers += len(rulePeers)
		for j := range rulePeers {
			peer := &rulePeers[j]
			at := rule.Child(dir.peerField()).Index(j)
			if peer.PodSelector != nil || peer.NamespaceSelector != nil {
				if selectors++; selectors > MaxSelectorPeers {
					return fieldError(at, "the policy has more than %d peers with selectors in all (MaxSelectorPeers): select by a shared label instead, or split the policy", MaxSelectorPeers)
				}
			}
			if peer.IPBlock != nil {
				if excepts+len(peer.IPBlock.Except) > MaxExcepts {
					return fieldError(at.Child("ipBlock", "except").Index(MaxExcepts-excepts), "the policy has more than %d ipBlock excepts in all (MaxExcepts): allow the wanted CIDRs instead of carving holes, or split the policy", MaxExcepts)
				}
				excepts += len(peer.IPBlock.Except)
			}
		}
		return nil
	}
	for i := range np.Spec.Ingress {
		if err := check(Ingress, i, np.Spec.Ingress[i].From, np.Spec.Ingress[i].Ports); err != nil {
			return err
		}
	}
	for i := range np.Spec.Egress {
		if err := check(Egress, i, np.Spec.Egress[i].To, np.Spec.Egress[i].Ports); err != nil {
			return err
		}
	}
	return nil
}
