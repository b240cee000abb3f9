package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// brokenState has three pods in namespace a and policies broken in different parts, next to a
// valid one.
func brokenState() *State {
	lbl := func(tier string) map[string]string { return map[string]string{"tier": tier} }
	port := intstr.FromString("")
	return &State{
		Pods: []corev1.Pod{
			pod("a", "db", "", lbl("db"), "10.0.0.2"),
			pod("a", "web", "", lbl("web"), "10.0.0.3"),
			pod("a", "cache", "", lbl("cache"), "10.0.0.4"),
			pod("b", "client", "", lbl("client"), "10.0.1.1"),
		},
		Policies: []networkingv1.NetworkPolicy{
			{ // a broken peer CIDR after a valid one
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "db"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: lbl("db")},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
						{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0"}},
						{IPBlock: &networkingv1.IPBlock{CIDR: "not-a-cidr"}},
					}}},
				},
			},
			{ // a broken pod selector
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "weird"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "tier", Operator: "Bogus"}}},
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{}},
				},
			},
			{ // a policy type that does not exist, on the client's namespace
				ObjectMeta: metav1.ObjectMeta{Namespace: "b", Name: "types"},
				Spec: networkingv1.NetworkPolicySpec{
					PolicyTypes: []networkingv1.PolicyType{"Sideways"},
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{}},
				},
			},
			{ // an empty named port in an egress rule: defaulted types are Ingress and Egress
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web-out"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: lbl("web")},
					Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &port}}}},
				},
			},
		},
	}
}

func TestCompileErrorNamesEveryPolicy(t *testing.T) {
	st := brokenState()
	snap, err := Compile(st, Options{})
	if snap != nil {
		t.Fatal("Compile returned a snapshot for invalid policies without IsolateInvalid")
	}
	var ce *CompileError
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a *CompileError", err, err)
	}
	want := []struct{ policy, field string }{
		{"a/db", "spec.ingress[0].from[1].ipBlock.cidr"},
		{"a/web-out", "spec.egress[0].ports[0].port"},
		{"a/weird", "spec.podSelector"},
		{"b/types", "spec.policyTypes[0]"},
	}
	if len(ce.Policies) != len(want) {
		t.Fatalf("CompileError lists %d policies, want %d: %v", len(ce.Policies), len(want), err)
	}
	for i, w := range want {
		if got := ce.Policies[i]; got.Policy != w.policy || got.Field != w.field || got.Err == nil {
			t.Errorf("policy error %d = {%q %q %v}, want {%q %q ...}", i, got.Policy, got.Field, got.Err, w.policy, w.field)
		}
		if !strings.Contains(err.Error(), "NetworkPolicy "+w.policy+": "+w.field+": ") {
			t.Errorf("message %q does not name %s at %s", err, w.policy, w.field)
		}
	}
	var pe *PolicyError
	if !errors.As(err, &pe) || pe.Policy != "a/db" {
		t.Errorf("errors.As finds the first *PolicyError: got %+v", pe)
	}
}

// With IsolateInvalid the broken policies isolate what they select, with none of their rules.
func TestCompileIsolateInvalid(t *testing.T) {
	st := brokenState()
	snap, err := Compile(st, Options{IsolateInvalid: true})
	var ce *CompileError
	if snap == nil || !errors.As(err, &ce) || len(ce.Policies) != 4 {
		t.Fatalf("Compile(IsolateInvalid) = %v, %v; want a snapshot and the 4 policy errors", snap, err)
	}
	if got := snap.Stats().Invalid; got != 4 {
		t.Errorf("Stats().Invalid = %d, want 4", got)
	}
	a := netip.MustParseAddr
	for _, c := range []struct {
		src, dst string
		want     Verdict
	}{
		{"192.0.2.1", "10.0.0.2", Verdict{false, ReasonIngress}}, // db: its 0.0.0.0/0 rule is gone
		{"192.0.2.1", "10.0.0.4", Verdict{false, ReasonIngress}}, // cache: the broken selector isolates all of a
		{"10.0.0.3", "10.0.1.1", Verdict{false, ReasonEgress}},   // web: egress isolated, no rule
		{"10.0.1.1", "192.0.2.1", Verdict{false, ReasonEgress}},  // client: an unknown type isolates both ways
		{"192.0.2.1", "10.0.1.1", Verdict{false, ReasonIngress}},
	} {
		f := Flow{Src: a(c.src), Dst: a(c.dst), Proto: TCP, Port: 80}
		if got := snap.Decide(f); got != c.want {
			t.Errorf("%s -> %s = %+v, want %+v", c.src, c.dst, got, c.want)
		}
	}
	// A rule compiled before the broken one in the same policy is not left behind.
	e := snap.Explain(Flow{Src: a("192.0.2.1"), Dst: a("10.0.0.2"), Proto: TCP, Port: 80})
	if len(e.Ingress.IsolatingPolicies) == 0 || e.Ingress.IsolatingPolicies[0] != "a/db" || len(e.Ingress.MatchedBy) != 0 || len(e.Ingress.Unmatched) != 0 {
		t.Errorf("db's ingress side: %+v", e.Ingress)
	}
}
