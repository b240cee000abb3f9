package policy

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// brokenState has three pods in namespace a and policies broken in different parts, next to a
// valid one.
func brokenState() *State {
	lbl := func(tier string) map[string]string { return map[string]string{"tier": tier} }
	end := int32(90)
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
			{ // an endPort without a port in an egress rule: defaulted types are Ingress and Egress
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web-out"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: lbl("web")},
					Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{EndPort: &end}}}},
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
		{"a/web-out", "spec.egress[0].ports[0].endPort"},
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

// A duplicate address must not switch local enforcement off: for this node's decisions the
// local, running, non-terminating pod owns its address, whatever (namespace, name) order says.
func TestDuplicateAddressOwner(t *testing.T) {
	terminating := func(p corev1.Pod) corev1.Pod {
		p.DeletionTimestamp = &metav1.Time{Time: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
		return p
	}
	pending := func(p corev1.Pod) corev1.Pod {
		p.Status.Phase = corev1.PodPending
		return p
	}
	guarded := map[string]string{"guard": "deny"}
	st := &State{
		Pods: []corev1.Pod{
			// 10.0.0.5: a remote pod's stale status, in a namespace sorting first.
			pod("a-old", "stale", "n2", nil, "10.0.0.5"),
			pod("prod", "web", "n1", guarded, "10.0.0.5"),
			// 10.0.0.6: a local terminating pod still lists the address its successor got.
			terminating(pod("prod", "a-gone", "n1", nil, "10.0.0.6")),
			pod("prod", "b-new", "n1", guarded, "10.0.0.6"),
			// 10.0.0.7: a local terminating pod, and a remote pod that got the address since.
			terminating(pod("prod", "c-leaving", "n1", guarded, "10.0.0.7")),
			pod("prod", "d-remote", "n2", nil, "10.0.0.7"),
			// 10.0.0.8: a Pending pod and a Running one, both local.
			pending(pod("prod", "e-pending", "n1", nil, "10.0.0.8")),
			pod("prod", "f-running", "n1", guarded, "10.0.0.8"),
		},
		Policies: []networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "prod", Name: "deny-all"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: guarded},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			},
		}},
	}
	s, err := Compile(st, Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr
	outside := a("192.0.2.1")
	for _, c := range []struct {
		ip    string
		owner string
		local bool
		in    Verdict // outside -> ip
		out   Verdict // ip -> outside
	}{
		{"10.0.0.5", "prod/web", true, Verdict{false, ReasonIngress}, Verdict{false, ReasonEgress}},
		{"10.0.0.6", "prod/b-new", true, Verdict{false, ReasonIngress}, Verdict{false, ReasonEgress}},
		{"10.0.0.7", "prod/d-remote", false, Verdict{true, ReasonUnisolated}, Verdict{true, ReasonUnisolated}},
		{"10.0.0.8", "prod/f-running", true, Verdict{false, ReasonIngress}, Verdict{false, ReasonEgress}},
	} {
		ip := a(c.ip)
		in := s.Explain(Flow{Src: outside, Dst: ip, Proto: TCP, Port: 80})
		if in.Destination.Pod == nil || in.Destination.Pod.String() != c.owner || in.Destination.Local != c.local {
			t.Errorf("%s: destination %+v, want %s (local %v)", c.ip, in.Destination, c.owner, c.local)
		}
		if got := (Verdict{in.Allowed, reasonOf(t, in.Reason)}); got != c.in || in.Ingress.Enforced != c.local {
			t.Errorf("%s: inbound %+v (ingress enforced %v), want %+v (%v)", c.ip, got, in.Ingress.Enforced, c.in, c.local)
		}
		out := s.Explain(Flow{Src: ip, Dst: outside, Proto: TCP, Port: 80})
		if out.Source.Pod == nil || out.Source.Pod.String() != c.owner {
			t.Errorf("%s: source %+v, want %s", c.ip, out.Source, c.owner)
		}
		if got := (Verdict{out.Allowed, reasonOf(t, out.Reason)}); got != c.out || out.Egress.Enforced != c.local {
			t.Errorf("%s: outbound %+v (egress enforced %v), want %+v (%v)", c.ip, got, out.Egress.Enforced, c.out, c.local)
		}
		if s.IsLocal(ip) != c.local || slices.Contains(s.LocalPodIPs(), ip) != c.local {
			t.Errorf("%s: IsLocal %v, in LocalPodIPs %v; want both %v", c.ip, s.IsLocal(ip), slices.Contains(s.LocalPodIPs(), ip), c.local)
		}
		for _, f := range []Flow{{Src: outside, Dst: ip, Proto: TCP, Port: 80}, {Src: ip, Dst: outside, Proto: TCP, Port: 80}} {
			if want := ReferenceDecide(st, Options{Node: "n1"}, f); s.Decide(f) != want {
				t.Errorf("%s -> %s: Decide %+v, reference %+v", f.Src, f.Dst, s.Decide(f), want)
			}
		}
	}
	if ips := s.LocalPodIPs(); len(ips) != 3 {
		t.Errorf("LocalPodIPs() = %v, want the three addresses local pods own, once each", ips)
	}
}

func reasonOf(t *testing.T, word string) Reason {
	for r := ReasonUnisolated; r <= ReasonIngress; r++ {
		if r.String() == word {
			return r
		}
	}
	t.Fatalf("unknown reason %q", word)
	return 0
}

// Named ports resolve against the pod's containers and its sidecars (init containers with
// restartPolicy Always), never against ordinary init containers, which have exited before the
// pod serves; for ingress at a local pod and for egress to a remote one alike.
func TestSidecarNamedPorts(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	server := func(name, node, ip string) corev1.Pod {
		p := pod("a", name, node, map[string]string{"app": "server"}, ip)
		p.Spec.Containers = []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}}
		p.Spec.InitContainers = []corev1.Container{
			{Name: "proxy", RestartPolicy: &always, Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9090}}},
			{Name: "setup", Ports: []corev1.ContainerPort{{Name: "setup", ContainerPort: 7000}}},
		}
		return p
	}
	named := func(names ...string) []networkingv1.NetworkPolicyPort {
		var out []networkingv1.NetworkPolicyPort
		for _, n := range names {
			p := intstr.FromString(n)
			out = append(out, networkingv1.NetworkPolicyPort{Port: &p})
		}
		return out
	}
	st := &State{
		Pods: []corev1.Pod{
			server("local", "n1", "10.0.0.1"),
			server("remote", "n2", "10.0.1.1"),
			pod("a", "client", "n1", map[string]string{"app": "client"}, "10.0.0.2"),
		},
		Policies: []networkingv1.NetworkPolicy{
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "server"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: named("http", "metrics", "setup")}},
				},
			},
			{
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "client"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
					Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: named("http", "metrics", "setup")}},
				},
			},
		},
	}
	opt := Options{Node: "n1"}
	s, err := Compile(st, opt)
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr
	for _, c := range []struct {
		src, dst string
		port     uint16
		want     Verdict
	}{
		{"192.0.2.1", "10.0.0.1", 80, Verdict{true, ReasonRule}},
		{"192.0.2.1", "10.0.0.1", 9090, Verdict{true, ReasonRule}}, // the sidecar's port
		{"192.0.2.1", "10.0.0.1", 7000, Verdict{false, ReasonIngress}},
		{"10.0.0.2", "10.0.1.1", 9090, Verdict{true, ReasonRule}}, // egress to a remote pod's sidecar
		{"10.0.0.2", "10.0.1.1", 7000, Verdict{false, ReasonEgress}},
		{"10.0.0.2", "10.0.1.1", 80, Verdict{true, ReasonRule}},
	} {
		f := Flow{Src: a(c.src), Dst: a(c.dst), Proto: TCP, Port: c.port}
		if got := s.Decide(f); got != c.want {
			t.Errorf("%s -> %s:%d = %+v, want %+v", c.src, c.dst, c.port, got, c.want)
		}
		if got := ReferenceDecide(st, opt, f); got != c.want {
			t.Errorf("reference: %s -> %s:%d = %+v, want %+v", c.src, c.dst, c.port, got, c.want)
		}
	}
	e := s.Explain(Flow{Src: a("192.0.2.1"), Dst: a("10.0.0.1"), Proto: TCP, Port: 7000})
	if len(e.Ingress.Unmatched) != 1 || !strings.Contains(e.Ingress.Unmatched[0], "http/TCP, metrics/TCP, setup/TCP") {
		t.Errorf("Explain of the init container's port: %+v", e.Ingress)
	}
	if got := Lint(st); slices.ContainsFunc(got, func(f Finding) bool {
		return f.Check == CheckNamedPortUnresolved && strings.Contains(f.Message, `"metrics"`)
	}) {
		t.Errorf("lint says the sidecar's port resolves nowhere: %v", got)
	}
}
