package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// maxReportedErrors bounds the error list of one Validate call: a dump with thousands of broken
// objects helps nobody when printed in full, and the first ones show the pattern.
const maxReportedErrors = 50

// Validate checks st as the API server would have before storing it, and returns every problem
// found (errors.Join), each naming the object (kind namespace/name) and the field path. Call it
// after Default: like the API server, it expects defaulted objects (a policy without namespace
// is reported as such).
//
// It covers every field that changes a verdict: label selectors (operators; values required
// for In/NotIn and forbidden for Exists/DoesNotExist; key and value syntax), ipBlock CIDRs
// (parseable, canonical, `except` strictly inside `cidr` and of the same family), ports (1-65535,
// endPort only with a numeric port and not below it, IANA_SVC_NAME syntax for named ports),
// protocols (TCP, UDP, SCTP), policyTypes, peers (at least one selector or an ipBlock, and an
// ipBlock alone), object names and labels, pod IPs, container ports, and duplicate names (same
// kind, namespace and name). Anything it rejects would be rejected by the API server too, so an
// invalid selector can never be read as "allow".
//
// It is deliberately lenient where a field cannot change a verdict (a pod without containers or
// image is fine in a state file).
func Validate(st *State) error {
	return validateState(st, func(kind string, i int) string {
		switch kind {
		case "Namespace":
			return "Namespace " + st.Namespaces[i].Name
		case "Pod":
			return "Pod " + st.Pods[i].Namespace + "/" + st.Pods[i].Name
		default:
			return "NetworkPolicy " + st.Policies[i].Namespace + "/" + st.Policies[i].Name
		}
	})
}

// locator names where object i of kind came from, for error messages.
type locator func(kind string, i int) string

func validateState(st *State, where locator) error {
	if st == nil {
		return errors.New("no state")
	}
	var errs []error
	more := 0
	report := func(kind string, i int, list field.ErrorList) {
		for _, e := range list {
			if len(errs) >= maxReportedErrors {
				more++
				continue
			}
			errs = append(errs, fmt.Errorf("%s: %s", where(kind, i), e.Error()))
		}
	}
	seen := make(map[string]string) // kind/namespace/name -> where it was first defined
	dup := func(kind string, i int, ns, name string) {
		if name == "" {
			return // reported as missing by the metadata check
		}
		key := kind + "\x00" + ns + "\x00" + name
		if first, ok := seen[key]; ok {
			report(kind, i, field.ErrorList{field.Invalid(field.NewPath("metadata", "name"), name,
				fmt.Sprintf("is already defined by %s; names are unique per kind and namespace, so remove or rename one", first))})
			return
		}
		seen[key] = where(kind, i)
	}

	for i := range st.Namespaces {
		ns := &st.Namespaces[i]
		report("Namespace", i, apivalidation.ValidateObjectMeta(&ns.ObjectMeta, false, apivalidation.NameIsDNSLabel, field.NewPath("metadata")))
		dup("Namespace", i, "", ns.Name)
	}
	for i := range st.Pods {
		p := &st.Pods[i]
		report("Pod", i, validatePod(p))
		dup("Pod", i, p.Namespace, p.Name)
	}
	for i := range st.Policies {
		np := &st.Policies[i]
		report("NetworkPolicy", i, validateNetworkPolicy(np))
		dup("NetworkPolicy", i, np.Namespace, np.Name)
	}
	if more > 0 {
		errs = append(errs, fmt.Errorf("... and %d more problems not shown; fix the ones above and run again", more))
	}
	return errors.Join(errs...)
}

func validatePod(p *corev1.Pod) field.ErrorList {
	all := apivalidation.ValidateObjectMeta(&p.ObjectMeta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	all = append(all, validateContainerPorts(p.Spec.Containers, spec.Child("containers"))...)
	all = append(all, validateContainerPorts(p.Spec.InitContainers, spec.Child("initContainers"))...)

	status := field.NewPath("status")
	var podIP netip.Addr
	if p.Status.PodIP != "" {
		podIP, all = parseStrictIP(p.Status.PodIP, status.Child("podIP"), all)
	}
	podIPs := status.Child("podIPs")
	if len(p.Status.PodIPs) > 2 {
		all = append(all, field.TooMany(podIPs, len(p.Status.PodIPs), 2))
	}
	var families [2]bool
	for i, pip := range p.Status.PodIPs {
		path := podIPs.Index(i).Child("ip")
		var a netip.Addr
		a, all = parseStrictIP(pip.IP, path, all)
		if !a.IsValid() {
			continue
		}
		fam := 0
		if a.Is6() {
			fam = 1
		}
		if families[fam] {
			all = append(all, field.Invalid(path, pip.IP, "a pod has at most one IP per family (one IPv4, one IPv6)"))
		}
		families[fam] = true
		if i == 0 && podIP.IsValid() && a != podIP {
			all = append(all, field.Invalid(path, pip.IP, fmt.Sprintf("must equal status.podIP (%s): the first of podIPs is the primary IP", p.Status.PodIP)))
		}
	}
	return all
}

// parseStrictIP parses s as the API server's strict IP validation does (no leading zeros, no
// IPv4-mapped IPv6, no zone), appending an error to all when it does not.
func parseStrictIP(s string, path *field.Path, all field.ErrorList) (netip.Addr, field.ErrorList) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil || a.Zone() != "":
		return netip.Addr{}, append(all, field.Invalid(path, s, "is not a valid IP address (e.g. 10.244.1.5 or 2001:db8::5)"))
	case a.Is4In6():
		return netip.Addr{}, append(all, field.Invalid(path, s, "must not be an IPv4-mapped IPv6 address; write the IPv4 address "+a.Unmap().String()))
	}
	return a, all
}

func validateContainerPorts(cs []corev1.Container, path *field.Path) field.ErrorList {
	var all field.ErrorList
	for i := range cs {
		names := make(map[string]bool)
		for j, port := range cs[i].Ports {
			pp := path.Index(i).Child("ports").Index(j)
			for _, msg := range validation.IsValidPortNum(int(port.ContainerPort)) {
				all = append(all, field.Invalid(pp.Child("containerPort"), port.ContainerPort, msg))
			}
			if port.Name != "" {
				for _, msg := range validation.IsValidPortName(port.Name) {
					all = append(all, field.Invalid(pp.Child("name"), port.Name, msg))
				}
				if names[port.Name] {
					all = append(all, field.Duplicate(pp.Child("name"), port.Name))
				}
				names[port.Name] = true
			}
			all = append(all, validateProtocol(port.Protocol, pp.Child("protocol"))...)
		}
	}
	return all
}

var supportedProtocols = []string{string(corev1.ProtocolTCP), string(corev1.ProtocolUDP), string(corev1.ProtocolSCTP)}

func validateProtocol(p corev1.Protocol, path *field.Path) field.ErrorList {
	switch p {
	case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
		return nil
	}
	return field.ErrorList{field.NotSupported(path, p, supportedProtocols)}
}

func validateNetworkPolicy(np *networkingv1.NetworkPolicy) field.ErrorList {
	all := apivalidation.ValidateObjectMeta(&np.ObjectMeta, true, apivalidation.NameIsDNSSubdomain, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	all = append(all, validateSelector(&np.Spec.PodSelector, spec.Child("podSelector"))...)
	for i := range np.Spec.Ingress {
		r := &np.Spec.Ingress[i]
		rp := spec.Child("ingress").Index(i)
		for j := range r.Ports {
			all = append(all, validatePolicyPort(&r.Ports[j], rp.Child("ports").Index(j))...)
		}
		for j := range r.From {
			all = append(all, validatePeer(&r.From[j], rp.Child("from").Index(j))...)
		}
	}
	for i := range np.Spec.Egress {
		r := &np.Spec.Egress[i]
		rp := spec.Child("egress").Index(i)
		for j := range r.Ports {
			all = append(all, validatePolicyPort(&r.Ports[j], rp.Child("ports").Index(j))...)
		}
		for j := range r.To {
			all = append(all, validatePeer(&r.To[j], rp.Child("to").Index(j))...)
		}
	}
	types := spec.Child("policyTypes")
	if len(np.Spec.PolicyTypes) > 2 {
		all = append(all, field.TooMany(types, len(np.Spec.PolicyTypes), 2))
	}
	for i, t := range np.Spec.PolicyTypes {
		if t != networkingv1.PolicyTypeIngress && t != networkingv1.PolicyTypeEgress {
			all = append(all, field.NotSupported(types.Index(i), t, []string{string(networkingv1.PolicyTypeIngress), string(networkingv1.PolicyTypeEgress)}))
		}
	}
	return all
}

func validateSelector(sel *metav1.LabelSelector, path *field.Path) field.ErrorList {
	return metav1validation.ValidateLabelSelector(sel, metav1validation.LabelSelectorValidationOptions{}, path)
}

func validatePeer(peer *networkingv1.NetworkPolicyPeer, path *field.Path) field.ErrorList {
	var all field.ErrorList
	n := 0
	if peer.PodSelector != nil {
		n++
		all = append(all, validateSelector(peer.PodSelector, path.Child("podSelector"))...)
	}
	if peer.NamespaceSelector != nil {
		n++
		all = append(all, validateSelector(peer.NamespaceSelector, path.Child("namespaceSelector"))...)
	}
	if peer.IPBlock != nil {
		n++
		all = append(all, validateIPBlock(peer.IPBlock, path.Child("ipBlock"))...)
	}
	switch {
	case n == 0:
		all = append(all, field.Required(path, "a peer needs podSelector, namespaceSelector or ipBlock; to allow every peer, omit from/to altogether"))
	case peer.IPBlock != nil && n > 1:
		all = append(all, field.Forbidden(path, "ipBlock cannot be combined with podSelector or namespaceSelector in one peer; make them separate list items"))
	}
	return all
}

func validateIPBlock(b *networkingv1.IPBlock, path *field.Path) field.ErrorList {
	var all field.ErrorList
	if b.CIDR == "" {
		return append(all, field.Required(path.Child("cidr"), "e.g. 10.0.0.0/24 or 2001:db8::/64"))
	}
	cidr, all := parseStrictCIDR(b.CIDR, path.Child("cidr"), all)
	for i, ex := range b.Except {
		ep := path.Child("except").Index(i)
		var e netip.Prefix
		e, all = parseStrictCIDR(ex, ep, all)
		if !e.IsValid() || !cidr.IsValid() {
			continue
		}
		if e.Addr().Is4() != cidr.Addr().Is4() {
			all = append(all, field.Invalid(ep, ex, fmt.Sprintf("is not of the same IP family as cidr %s", b.CIDR)))
			continue
		}
		if e.Bits() <= cidr.Bits() || !cidr.Contains(e.Addr()) {
			all = append(all, field.Invalid(ep, ex, fmt.Sprintf("must be a strict subset of cidr %s", b.CIDR)))
		}
	}
	return all
}

// parseStrictCIDR accepts what the API server's strict CIDR validation accepts: no leading
// zeros, no IPv4-mapped IPv6, and no bits set past the prefix length (10.0.0.1/24 is ambiguous:
// a host or a network?).
func parseStrictCIDR(s string, path *field.Path, all field.ErrorList) (netip.Prefix, field.ErrorList) {
	p, err := netip.ParsePrefix(s)
	switch {
	case err != nil:
		return netip.Prefix{}, append(all, field.Invalid(path, s, "is not a valid CIDR (e.g. 10.0.0.0/24 or 2001:db8::/64)"))
	case p.Addr().Is4In6():
		return netip.Prefix{}, append(all, field.Invalid(path, s, "must not use an IPv4-mapped IPv6 address; write the IPv4 CIDR"))
	case p.Masked() != p:
		return netip.Prefix{}, append(all, field.Invalid(path, s, fmt.Sprintf("has bits set past the prefix length; did you mean %s?", p.Masked())))
	}
	return p, all
}

func validatePolicyPort(port *networkingv1.NetworkPolicyPort, path *field.Path) field.ErrorList {
	var all field.ErrorList
	if port.Protocol != nil {
		all = append(all, validateProtocol(*port.Protocol, path.Child("protocol"))...)
	}
	switch {
	case port.Port == nil:
		if port.EndPort != nil {
			all = append(all, field.Invalid(path.Child("endPort"), *port.EndPort, "may not be specified without `port`"))
		}
	case port.Port.Type == intstr.Int:
		for _, msg := range validation.IsValidPortNum(int(port.Port.IntVal)) {
			all = append(all, field.Invalid(path.Child("port"), port.Port.IntVal, msg))
		}
		if port.EndPort != nil {
			for _, msg := range validation.IsValidPortNum(int(*port.EndPort)) {
				all = append(all, field.Invalid(path.Child("endPort"), *port.EndPort, msg))
			}
			if *port.EndPort < port.Port.IntVal {
				all = append(all, field.Invalid(path.Child("endPort"), *port.EndPort, "must be greater than or equal to `port` ("+strconv.Itoa(int(port.Port.IntVal))+")"))
			}
		}
	default:
		for _, msg := range validation.IsValidPortName(port.Port.StrVal) {
			all = append(all, field.Invalid(path.Child("port"), port.Port.StrVal, msg))
		}
		if port.EndPort != nil {
			all = append(all, field.Invalid(path.Child("endPort"), *port.EndPort, "may not be specified when `port` is a name; use a numeric port"))
		}
	}
	return all
}
