package policy

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func pod(ns, name, node string, lbl map[string]string, ips ...string) corev1.Pod {
	p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbl}}
	p.Spec.NodeName = node
	p.Status.Phase = corev1.PodRunning
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func tcp(port int) networkingv1.NetworkPolicyPort {
	pr := corev1.ProtocolTCP
	p := intstr.FromInt32(int32(port))
	return networkingv1.NetworkPolicyPort{Protocol: &pr, Port: &p}
}

// smallState: backend accepts only frontend on 8080; frontend may only talk to backend and to
// 10.0.0.0/24 except 10.0.0.128/25; db is on another node.
func smallState() *State {
	return &State{
		Namespaces: []corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "prod"}}},
		Pods: []corev1.Pod{
			pod("prod", "frontend", "n1", map[string]string{"tier": "frontend"}, "10.244.0.1", "fd00::1"),
			pod("prod", "backend", "n1", map[string]string{"tier": "backend"}, "10.244.0.2", "fd00::2"),
			pod("prod", "db", "n2", map[string]string{"tier": "db"}, "10.244.1.3"),
		},
		Policies: []networkingv1.NetworkPolicy{
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "backend"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "backend"}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{
						From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "frontend"}}}},
						Ports: []networkingv1.NetworkPolicyPort{tcp(8080)},
					}},
				},
			},
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "frontend"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "frontend"}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "backend"}}}}},
						{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/24", Except: []string{"10.0.0.128/25"}}}}},
					},
				},
			},
		},
	}
}

func TestDecideSmall(t *testing.T) {
	s, err := Compile(smallState(), Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr
	cases := []struct {
		src, dst string
		port     uint16
		want     Verdict
	}{
		{"10.244.0.1", "10.244.0.2", 8080, Verdict{true, ReasonRule}},
		{"fd00::1", "fd00::2", 8080, Verdict{true, ReasonRule}},
		{"10.244.0.1", "10.244.0.2", 8081, Verdict{false, ReasonIngress}},
		{"10.244.1.3", "10.244.0.2", 8080, Verdict{false, ReasonIngress}},
		{"10.244.0.1", "10.0.0.5", 443, Verdict{true, ReasonRule}},
		{"10.244.0.1", "10.0.0.200", 443, Verdict{false, ReasonEgress}},
		{"10.244.0.1", "10.244.1.3", 5432, Verdict{false, ReasonEgress}},
		// db is remote: its ingress is not judged here, and backend is not egress-isolated.
		{"10.244.0.2", "10.244.1.3", 5432, Verdict{true, ReasonUnisolated}},
		{"192.0.2.1", "10.244.1.3", 5432, Verdict{true, ReasonUnisolated}},
	}
	for _, c := range cases {
		f := Flow{Src: a(c.src), Dst: a(c.dst), Proto: TCP, Port: c.port}
		if got := s.Decide(f); got != c.want {
			t.Errorf("Decide(%s -> %s:%d) = %+v, want %+v\n%+v", c.src, c.dst, c.port, got, c.want, s.Explain(f))
		}
		if e := s.Explain(f); e.Allowed != c.want.Allowed || e.Reason != c.want.Reason.String() {
			t.Errorf("Explain(%s -> %s:%d) = %v/%s, want %+v", c.src, c.dst, c.port, e.Allowed, e.Reason, c.want)
		}
	}
	e := s.Explain(Flow{Src: a("10.244.0.1"), Dst: a("10.244.0.2"), Proto: TCP, Port: 9})
	if len(e.Ingress.Unmatched) != 1 || e.Ingress.IsolatingPolicies[0] != "prod/backend" {
		t.Errorf("explanation of a port miss: %+v", e.Ingress)
	}
}

func TestDecideAllocs(t *testing.T) {
	s, err := Compile(smallState(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := Flow{Src: netip.MustParseAddr("10.244.0.1"), Dst: netip.MustParseAddr("10.0.0.5"), Proto: TCP, Port: 443}
	if n := testing.AllocsPerRun(1000, func() { s.Decide(f) }); n != 0 {
		t.Fatalf("Decide allocates %v times per call", n)
	}
}
