// Package clustergen builds deterministic, realistic-looking clusters (namespaces, pods and
// NetworkPolicies) and flow mixes of any size, for benchmarks and load tests. The same
// (policies, seed) always yields the same cluster, so figures from different runs and from the
// compiled and the reference evaluator can be compared line by line.
package clustergen

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-dev/sluice/policy"
)

// MaxPods caps the pod count: 50k pods is the upper end of a real cluster's pod count.
const MaxPods = 50000

var (
	teams   = []string{"payments", "search", "identity", "catalog", "checkout", "ads", "infra", "data"}
	tiers   = []string{"frontend", "backend", "database", "cache", "worker"}
	envs    = []string{"prod", "staging", "dev"}
	appsPer = 12 // distinct app labels per namespace
)

// Sizes reports the pod and namespace counts Generate uses for n policies.
func Sizes(n int) (pods, namespaces int) {
	pods = 5 * n
	if pods > MaxPods {
		pods = MaxPods
	}
	if pods < 10 {
		pods = 10
	}
	return pods, n/10 + 1
}

// Generate returns a cluster with n NetworkPolicies, about 5n pods (at most MaxPods) and
// n/10+1 namespaces, plus kube-system with DNS pods. Objects are as a user would write them
// (policyTypes sometimes omitted, protocols sometimes left to default), but always valid.
func Generate(n int, seed uint64) *policy.State {
	r := rand.New(rand.NewPCG(seed, 0x5eed5eed))
	nPods, nNS := Sizes(n)
	g := &gen{r: r}

	st := &policy.State{}
	st.Namespaces = append(st.Namespaces, corev1.Namespace{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
		ObjectMeta: metav1.ObjectMeta{Name: "kube-system", Labels: map[string]string{"kubernetes.io/metadata.name": "kube-system"}},
	})
	for i := 0; i < nNS; i++ {
		team := teams[i%len(teams)]
		labels := map[string]string{"team": team, "env": envs[r.IntN(len(envs))]}
		if i == 0 {
			labels["purpose"] = "monitoring"
		}
		// Some files come without the name label; the API server would add it.
		if r.IntN(4) != 0 {
			labels["kubernetes.io/metadata.name"] = nsName(i)
		}
		st.Namespaces = append(st.Namespaces, corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: nsName(i), Labels: labels},
		})
		g.nsTeams = append(g.nsTeams, team)
	}

	nodes := nPods/100 + 1
	ipIndex := uint32(2)
	dnsPods := 2
	for i := 0; i < dnsPods; i++ {
		st.Pods = append(st.Pods, g.pod("kube-system", fmt.Sprintf("coredns-%d", i),
			map[string]string{"k8s-app": "kube-dns"}, dnsPorts(), fmt.Sprintf("node-%d", i%nodes), ipIndex, true))
		ipIndex++
	}
	for i := 0; i < nPods-dnsPods; i++ {
		ns := i % nNS
		tier := tiers[r.IntN(len(tiers))]
		labels := map[string]string{
			"app":  fmt.Sprintf("app-%d", r.IntN(appsPer)),
			"tier": tier,
			"team": g.nsTeams[ns],
		}
		if r.IntN(3) == 0 {
			labels["version"] = []string{"v1", "v2"}[r.IntN(2)]
		}
		if r.IntN(40) == 0 {
			labels = nil // jobs and strays without labels
		}
		p := g.pod(nsName(ns), fmt.Sprintf("%s-%d", tier, i), labels, tierPorts(tier, r),
			fmt.Sprintf("node-%d", r.IntN(nodes)), ipIndex, r.IntN(10) < 4)
		ipIndex++
		switch r.IntN(100) {
		case 0:
			p.Spec.HostNetwork = true
			p.Status.PodIPs = []corev1.PodIP{{IP: fmt.Sprintf("192.168.%d.%d", 100+r.IntN(50), 1+r.IntN(250))}}
			p.Status.PodIP = p.Status.PodIPs[0].IP
		case 1:
			p.Status.Phase = corev1.PodFailed
		case 2:
			p.Status.Phase = corev1.PodPending
			p.Status.PodIP, p.Status.PodIPs = "", nil
		}
		st.Pods = append(st.Pods, p)
	}

	for i := 0; i < n; i++ {
		st.Policies = append(st.Policies, g.policy(i, nNS))
	}
	return st
}

func nsName(i int) string {
	if i == 0 {
		return "monitoring"
	}
	return fmt.Sprintf("%s-%d", teams[i%len(teams)], i)
}

type gen struct {
	r       *rand.Rand
	nsTeams []string
}

// PodV4 and PodV6 give the addresses of the i-th pod slot: 10.244.0.0/16 and fd00:10:244::/64.
func PodV4(i uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)})
}

func PodV6(i uint32) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, byte(i >> 8), byte(i)})
}

func (g *gen) pod(ns, name string, labels map[string]string, ports []corev1.ContainerPort, node string, ipIndex uint32, dual bool) corev1.Pod {
	v4 := PodV4(ipIndex).String()
	ips := []corev1.PodIP{{IP: v4}}
	if dual {
		ips = append(ips, corev1.PodIP{IP: PodV6(ipIndex).String()})
	}
	return corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "main", Image: "registry.example/app:1", Ports: ports}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: v4, PodIPs: ips},
	}
}

func dnsPorts() []corev1.ContainerPort {
	return []corev1.ContainerPort{
		{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
		{Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
		{Name: "metrics", ContainerPort: 9153, Protocol: corev1.ProtocolTCP},
	}
}

func tierPorts(tier string, r *rand.Rand) []corev1.ContainerPort {
	switch tier {
	case "frontend":
		return []corev1.ContainerPort{{Name: "http", ContainerPort: 80}, {Name: "https", ContainerPort: 443}}
	case "backend":
		// Backends disagree on where "http" lives: named ports resolve per destination pod.
		http := []int32{8080, 8000, 3000}[r.IntN(3)]
		return []corev1.ContainerPort{
			{Name: "http", ContainerPort: http, Protocol: corev1.ProtocolTCP},
			{Name: "grpc", ContainerPort: 9090},
			{Name: "metrics", ContainerPort: 9100},
		}
	case "database":
		if r.IntN(2) == 0 {
			return []corev1.ContainerPort{{Name: "postgres", ContainerPort: 5432}, {Name: "metrics", ContainerPort: 9187}}
		}
		return []corev1.ContainerPort{{Name: "mysql", ContainerPort: 3306}, {Name: "metrics", ContainerPort: 9104}}
	case "cache":
		return []corev1.ContainerPort{{Name: "redis", ContainerPort: 6379}}
	}
	ports := []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9100}}
	if r.IntN(4) == 0 {
		ports = append(ports, corev1.ContainerPort{Name: "sigtran", ContainerPort: 2905, Protocol: corev1.ProtocolSCTP})
	}
	if r.IntN(4) == 0 {
		ports = append(ports, corev1.ContainerPort{Name: "syslog", ContainerPort: 514, Protocol: corev1.ProtocolUDP})
	}
	return ports
}

func protoPtr(p corev1.Protocol) *corev1.Protocol { return &p }
func int32Ptr(v int32) *int32                     { return &v }

func numPort(p int32) *intstr.IntOrString    { v := intstr.FromInt32(p); return &v }
func namedPort(s string) *intstr.IntOrString { v := intstr.FromString(s); return &v }

func (g *gen) policy(i, nNS int) networkingv1.NetworkPolicy {
	r := g.r
	ns := i % nNS
	np := networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: nsName(ns), Name: fmt.Sprintf("np-%d", i)},
	}
	switch k := r.IntN(100); {
	case k < 6: // default deny ingress (and sometimes egress)
		np.Name = fmt.Sprintf("default-deny-%d", i)
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if r.IntN(2) == 0 {
			np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
		}
	case k < 12: // DNS allowance for egress-isolated namespaces
		np.Name = fmt.Sprintf("allow-dns-%d", i)
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{
			To: []networkingv1.NetworkPolicyPeer{{
				NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "kube-system"}},
				PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"k8s-app": "kube-dns"}},
			}},
			Ports: []networkingv1.NetworkPolicyPort{
				{Protocol: protoPtr(corev1.ProtocolUDP), Port: numPort(53)},
				{Protocol: protoPtr(corev1.ProtocolTCP), Port: numPort(53)},
			},
		}}
	case k < 16: // scraping from the monitoring namespace
		np.Name = fmt.Sprintf("allow-monitoring-%d", i)
		np.Spec.PodSelector = metav1.LabelSelector{}
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{
				NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"purpose": "monitoring"}},
			}},
			Ports: []networkingv1.NetworkPolicyPort{{Port: namedPort("metrics")}},
		}}
	default: // an application's own policy
		np.Spec.PodSelector = g.podSelector()
		if r.IntN(5) != 0 {
			np.Spec.Ingress = g.ingressRules(ns)
		}
		if r.IntN(5) == 0 {
			np.Spec.Egress = g.egressRules(ns)
		}
		switch r.IntN(3) {
		case 0: // leave policyTypes to defaulting
		case 1:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
			if len(np.Spec.Egress) > 0 {
				np.Spec.PolicyTypes = append(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
			}
		case 2:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
	}
	return np
}

func (g *gen) podSelector() metav1.LabelSelector {
	r := g.r
	switch r.IntN(6) {
	case 0:
		return metav1.LabelSelector{MatchLabels: map[string]string{"tier": tiers[r.IntN(len(tiers))]}}
	case 1:
		return metav1.LabelSelector{
			MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", r.IntN(appsPer))},
			MatchExpressions: []metav1.LabelSelectorRequirement{{
				Key: "version", Operator: metav1.LabelSelectorOpIn, Values: []string{"v1", "v2"},
			}},
		}
	case 2:
		return metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "tier", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"database", "cache"}},
			{Key: "app", Operator: metav1.LabelSelectorOpExists},
		}}
	}
	return metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", r.IntN(appsPer))}}
}

func (g *gen) peer(ns int, egress bool) networkingv1.NetworkPolicyPeer {
	r := g.r
	switch r.IntN(7) {
	case 0:
		return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{
			MatchLabels: map[string]string{"tier": tiers[r.IntN(len(tiers))]}}}
	case 1:
		return networkingv1.NetworkPolicyPeer{NamespaceSelector: &metav1.LabelSelector{
			MatchLabels: map[string]string{"team": teams[r.IntN(len(teams))]}}}
	case 2:
		return networkingv1.NetworkPolicyPeer{
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: "env", Operator: metav1.LabelSelectorOpIn, Values: []string{"prod", "staging"}}}},
			PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", r.IntN(appsPer))}},
		}
	case 3:
		return networkingv1.NetworkPolicyPeer{
			NamespaceSelector: &metav1.LabelSelector{},
			PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: "team", Operator: metav1.LabelSelectorOpIn, Values: []string{g.nsTeams[ns]}},
				{Key: "version", Operator: metav1.LabelSelectorOpDoesNotExist}}},
		}
	case 4:
		if egress {
			return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{
				CIDR: fmt.Sprintf("172.%d.%d.0/24", 16+r.IntN(16), r.IntN(256))}}
		}
		return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{
			CIDR: "0.0.0.0/0", Except: []string{"10.0.0.0/8", fmt.Sprintf("192.168.%d.0/24", r.IntN(256))}}}
	case 5:
		site := r.IntN(64)
		return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{
			CIDR:   fmt.Sprintf("2001:db8:%x::/48", site),
			Except: []string{fmt.Sprintf("2001:db8:%x:%x::/64", site, 1+r.IntN(3))}}}
	}
	// Pod IPs through an ipBlock: a slice of the pod network, minus its upper half.
	third := r.IntN(200)
	return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{
		CIDR: fmt.Sprintf("10.244.%d.0/24", third), Except: []string{fmt.Sprintf("10.244.%d.128/25", third)}}}
}

func (g *gen) ports() []networkingv1.NetworkPolicyPort {
	r := g.r
	n := r.IntN(4)
	var out []networkingv1.NetworkPolicyPort
	for j := 0; j < n; j++ {
		switch r.IntN(9) {
		case 0:
			out = append(out, networkingv1.NetworkPolicyPort{Port: numPort([]int32{80, 443, 8080, 5432, 6379, 3306}[r.IntN(6)])})
		case 1:
			out = append(out, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolTCP), Port: numPort(8000), EndPort: int32Ptr(8100)})
		case 2:
			out = append(out, networkingv1.NetworkPolicyPort{Port: namedPort([]string{"http", "https", "grpc", "metrics", "postgres", "redis"}[r.IntN(6)])})
		case 3:
			out = append(out, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolUDP), Port: numPort(514)})
		case 4:
			out = append(out, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolSCTP), Port: namedPort("sigtran")})
		case 5:
			out = append(out, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolUDP)})
		case 6:
			out = append(out, networkingv1.NetworkPolicyPort{Port: numPort(30000), EndPort: int32Ptr(32767)})
		default:
			out = append(out, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolTCP), Port: numPort([]int32{80, 8080, 9090, 9100}[r.IntN(4)])})
		}
	}
	return out
}

func (g *gen) ingressRules(ns int) []networkingv1.NetworkPolicyIngressRule {
	r := g.r
	rules := make([]networkingv1.NetworkPolicyIngressRule, 1+r.IntN(3))
	for j := range rules {
		if r.IntN(8) != 0 {
			for k := 0; k <= r.IntN(3); k++ {
				rules[j].From = append(rules[j].From, g.peer(ns, false))
			}
		}
		rules[j].Ports = g.ports()
	}
	return rules
}

func (g *gen) egressRules(ns int) []networkingv1.NetworkPolicyEgressRule {
	r := g.r
	rules := make([]networkingv1.NetworkPolicyEgressRule, 1+r.IntN(3))
	for j := range rules {
		if r.IntN(8) != 0 {
			for k := 0; k <= r.IntN(3); k++ {
				rules[j].To = append(rules[j].To, g.peer(ns, true))
			}
		}
		rules[j].Ports = g.ports()
	}
	return rules
}

// Flows returns n flows over st: about 70% pod to pod, 15% from outside to a pod and 15% from a
// pod to outside, on the ports the destination pods serve or on common service ports, in both
// address families where both ends have one. Deterministic in (st, n, seed).
func Flows(st *policy.State, n int, seed uint64) []policy.Flow {
	r := rand.New(rand.NewPCG(seed, 0xf10f10))
	type ep struct {
		v4, v6 netip.Addr
		ports  []corev1.ContainerPort
	}
	var pods []ep
	for i := range st.Pods {
		p := &st.Pods[i]
		if p.Spec.HostNetwork || p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			continue
		}
		var e ep
		for _, ip := range p.Status.PodIPs {
			a, err := netip.ParseAddr(ip.IP)
			if err != nil {
				continue
			}
			if a.Is4() {
				e.v4 = a
			} else {
				e.v6 = a
			}
		}
		if !e.v4.IsValid() {
			if a, err := netip.ParseAddr(p.Status.PodIP); err == nil && a.Is4() {
				e.v4 = a
			}
		}
		if !e.v4.IsValid() && !e.v6.IsValid() {
			continue
		}
		for _, c := range p.Spec.Containers {
			e.ports = append(e.ports, c.Ports...)
		}
		pods = append(pods, e)
	}
	if len(pods) == 0 {
		return nil
	}
	common := []struct {
		proto policy.Protocol
		port  uint16
	}{
		{policy.TCP, 80}, {policy.TCP, 443}, {policy.TCP, 8080}, {policy.TCP, 5432}, {policy.UDP, 53},
		{policy.TCP, 53}, {policy.TCP, 6379}, {policy.TCP, 22}, {policy.TCP, 9100}, {policy.TCP, 8050},
		{policy.TCP, 31000}, {policy.UDP, 514}, {policy.SCTP, 2905}, {policy.TCP, 3306},
	}
	external := func(v6 bool) netip.Addr {
		if v6 {
			return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(r.IntN(64)), 0, byte(r.IntN(4)), 0, 0, 0, 0, 0, 0, 0, byte(1 + r.IntN(250))})
		}
		switch r.IntN(4) {
		case 0:
			return netip.AddrFrom4([4]byte{172, byte(16 + r.IntN(16)), byte(r.IntN(256)), byte(1 + r.IntN(250))})
		case 1:
			return netip.AddrFrom4([4]byte{192, 168, byte(r.IntN(256)), byte(1 + r.IntN(250))})
		case 2:
			return netip.AddrFrom4([4]byte{10, byte(r.IntN(256)), byte(r.IntN(256)), byte(1 + r.IntN(250))})
		}
		return netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + r.IntN(250))})
	}
	flows := make([]policy.Flow, 0, n)
	for len(flows) < n {
		var f policy.Flow
		dst := pods[r.IntN(len(pods))]
		src := pods[r.IntN(len(pods))]
		v6 := dst.v6.IsValid() && src.v6.IsValid() && r.IntN(3) != 0
		pick := func(e ep) netip.Addr {
			if v6 {
				return e.v6
			}
			if e.v4.IsValid() {
				return e.v4
			}
			return e.v6
		}
		switch k := r.IntN(100); {
		case k < 70:
			f.Src, f.Dst = pick(src), pick(dst)
		case k < 85:
			f.Dst = pick(dst)
			f.Src = external(f.Dst.Is6())
		default:
			f.Src = pick(src)
			f.Dst = external(f.Src.Is6())
		}
		if f.Src.Is4() != f.Dst.Is4() {
			continue
		}
		if len(dst.ports) > 0 && r.IntN(10) < 6 {
			cp := dst.ports[r.IntN(len(dst.ports))]
			proto, _ := policy.ProtocolFromK8s(cp.Protocol)
			f.Proto, f.Port = proto, uint16(cp.ContainerPort)
		} else {
			c := common[r.IntN(len(common))]
			f.Proto, f.Port = c.proto, c.port
		}
		flows = append(flows, f)
	}
	return flows
}
