package policy

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

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
