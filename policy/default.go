package policy

import (
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Default applies, in place, the defaulting the API server performs before it stores an object,
// so that a hand-written state file means the same as what `kubectl get -o yaml` would print:
//
//   - a Pod or NetworkPolicy without metadata.namespace is in "default" (as kubectl apply does);
//   - every Namespace carries kubernetes.io/metadata.name=<name> (the API server overwrites any
//     other value, so we do too);
//   - a NetworkPolicy without policyTypes gets [Ingress], plus Egress when it has egress rules
//     (an explicitly empty `egress: []` cannot be told from an absent one, exactly as on the
//     API server);
//   - a NetworkPolicy port without protocol is TCP; a container port without protocol is TCP;
//   - a pod with status.podIP but no status.podIPs gets podIPs = [podIP], and the reverse, as the
//     kubelet always writes both.
//
// Default never removes or reorders anything, so field paths in validation errors still point
// at what the user wrote.
func Default(st *State) {
	if st == nil {
		return
	}
	for i := range st.Namespaces {
		applyNamespaceDefaults(&st.Namespaces[i])
	}
	for i := range st.Pods {
		applyPodDefaults(&st.Pods[i])
	}
	for i := range st.Policies {
		applyPolicyDefaults(&st.Policies[i])
	}
}

func applyNamespaceDefaults(ns *corev1.Namespace) {
	if ns.Name == "" {
		return // invalid; Validate reports it, and an empty label value would match nothing useful
	}
	if ns.Labels[corev1.LabelMetadataName] == ns.Name {
		return
	}
	// Copy before writing: the caller's map may be shared with other objects (decoders reuse
	// nothing, but a State built in code may).
	labels := make(map[string]string, len(ns.Labels)+1)
	for k, v := range ns.Labels {
		labels[k] = v
	}
	labels[corev1.LabelMetadataName] = ns.Name
	ns.Labels = labels
}

// namespaceOf is an object's namespace as the API server stores it: kubectl puts an object
// without one in "default".
func namespaceOf(ns string) string {
	if ns == "" {
		return corev1.NamespaceDefault
	}
	return ns
}

func applyPodDefaults(p *corev1.Pod) {
	p.Namespace = namespaceOf(p.Namespace)
	applyContainerPortDefaults(p.Spec.Containers)
	applyContainerPortDefaults(p.Spec.InitContainers)
	if len(p.Status.PodIPs) == 0 && p.Status.PodIP != "" {
		p.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	if p.Status.PodIP == "" && len(p.Status.PodIPs) > 0 {
		p.Status.PodIP = p.Status.PodIPs[0].IP
	}
}

func applyContainerPortDefaults(cs []corev1.Container) {
	for i := range cs {
		for j := range cs[i].Ports {
			if cs[i].Ports[j].Protocol == "" {
				cs[i].Ports[j].Protocol = corev1.ProtocolTCP
			}
		}
	}
}

func applyPolicyDefaults(np *networkingv1.NetworkPolicy) {
	np.Namespace = namespaceOf(np.Namespace)
	if len(np.Spec.PolicyTypes) == 0 {
		ingress, egress := PolicyTypes(np)
		if ingress {
			np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress)
		}
		if egress {
			np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
		}
	}
	for i := range np.Spec.Ingress {
		applyPortDefaults(np.Spec.Ingress[i].Ports)
	}
	for i := range np.Spec.Egress {
		applyPortDefaults(np.Spec.Egress[i].Ports)
	}
}

func applyPortDefaults(ps []networkingv1.NetworkPolicyPort) {
	for i := range ps {
		if ps[i].Protocol == nil {
			tcp := corev1.ProtocolTCP
			ps[i].Protocol = &tcp
		}
	}
}
