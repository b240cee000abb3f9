package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"pgregory.net/rapid"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func lintLoad(t *testing.T, path string) *State {
	t.Helper()
	st, _, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

type wantFinding struct {
	level                   Level
	namespace, policy, chck string
	contains                string
}

// checkFindings asserts that got holds exactly the wanted findings (each matched once).
func checkFindings(t *testing.T, got []Finding, want []wantFinding) {
	t.Helper()
	used := make([]bool, len(got))
	for _, w := range want {
		found := false
		for i, f := range got {
			if !used[i] && f.Level == w.level && f.Namespace == w.namespace && f.Policy == w.policy && f.Check == w.chck && strings.Contains(f.Message, w.contains) {
				used[i], found = true, true
				break
			}
		}
		if !found {
			t.Errorf("missing finding %+v", w)
		}
	}
	for i, f := range got {
		if !used[i] {
			t.Errorf("unexpected finding %s", f)
		}
	}
}

func TestLintThreeTier(t *testing.T) {
	got := Lint(lintLoad(t, "testdata/three-tier.yaml"))
	checkFindings(t, got, []wantFinding{
		// The seed's three-tier set has no deny-all of its own (the guide keeps those apart).
		{LevelWarning, "production", "", CheckDefaultDenyIngress, "namespace production has 3 pod(s)"},
		{LevelInfo, "production", "", CheckDefaultDenyEgress, "podSelector: {} and policyTypes: [Egress]"},
		{LevelWarning, "other", "", CheckDefaultDenyIngress, "namespace other has 1 pod(s)"},
		{LevelInfo, "other", "", CheckDefaultDenyEgress, ""},
		// backend-policy isolates egress and only allows the database: no DNS.
		{LevelWarning, "production", "backend-policy", CheckDNSEgress, "pod(s) production/backend, isolated for egress by backend-policy, may not send to UDP port 53"},
		// frontend-policy allows DNS over UDP only.
		{LevelInfo, "production", "frontend-policy", CheckDNSEgress, "not TCP port 53"},
	})
}

func TestLintChecksFire(t *testing.T) {
	got := Lint(lintLoad(t, "testdata/lint.yaml"))
	checkFindings(t, got, []wantFinding{
		{LevelWarning, "secure", "web", CheckShadowedRule, "spec.ingress[1] is shadowed by spec.ingress[0]"},
		{LevelWarning, "secure", "web", CheckNamedPortUnresolved, `spec.ingress[2].ports[0]: named port "metrics" (TCP)`},
		{LevelWarning, "secure", "ghost", CheckSelectsNothing, "spec.podSelector {app=ghost} matches none of the 2 pod(s) in namespace secure"},
		{LevelWarning, "secure", "db", CheckPeerMatchesNothing, "spec.ingress[0].from[0] allows nothing: namespaceSelector {team=nope} matches no namespace"},
		{LevelWarning, "secure", "db", CheckPeerMatchesNothing, "spec.ingress[0].from[1] allows nothing: podSelector {app=nobody} matches no pod"},
		{LevelWarning, "secure", "db", CheckShadowedRule, "spec.ingress[2] is shadowed by spec.ingress[1]"},
		{LevelWarning, "secure", "db", CheckNamedPortUnresolved, `spec.egress[0].ports[0]: named port "grpc" (TCP) is not a container port of any of the pods this rule may reach`},
	})
}

func TestLintWithoutPods(t *testing.T) {
	st := lintLoad(t, "testdata/three-tier.yaml")
	st.Pods = nil
	got := Lint(st)
	checkFindings(t, got, []wantFinding{
		{LevelInfo, "", "", CheckNoPods, "checks that need pods"},
		{LevelWarning, "production", "", CheckDefaultDenyIngress, "namespace production has 3 policy(ies)"},
		{LevelInfo, "production", "", CheckDefaultDenyEgress, ""},
		{LevelWarning, "production", "backend-policy", CheckDNSEgress, "the pods selected by backend-policy are isolated for egress and may not send"},
		{LevelInfo, "production", "frontend-policy", CheckDNSEgress, "not TCP port 53"},
	})

	// A select-all egress policy that allows DNS covers every other egress policy there.
	dns := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "allow-dns", Namespace: "production"}}
	udp, tcp := lintProto("UDP"), lintProto("TCP")
	dns.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	dns.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: udp, Port: lintPort(53)}, {Protocol: tcp, Port: lintPort(53)}}}}
	st.Policies = append(st.Policies, dns)
	for _, f := range Lint(st) {
		if f.Check == CheckDNSEgress {
			t.Errorf("DNS finding despite a namespace-wide DNS allowance: %s", f)
		}
	}
}

func TestLintSelectorCoverage(t *testing.T) {
	sel := func(s string) *metav1.LabelSelector {
		ls, err := metav1.ParseToLabelSelector(s)
		if err != nil {
			t.Fatal(err)
		}
		return ls
	}
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"", "app=web", true},
		{"app=web", "", false},
		{"app=web", "app=web,tier=x", true},
		{"app=web,tier=x", "app=web", false},
		{"app in (web,db)", "app=web", true},
		{"app in (web)", "app in (web,db)", false},
		{"app", "app=web", true},
		{"app", "app notin (web)", false},
		{"app notin (db)", "app=web", true},
		{"app notin (db)", "app notin (db,x)", true},
		{"app notin (db,x)", "app notin (db)", false},
		{"app notin (db)", "!app", true},
		{"!app", "app notin (db)", false},
		{"!app", "!app", true},
	} {
		if got := selectorCovers(sel(tc.a), sel(tc.b)); got != tc.want {
			t.Errorf("selectorCovers(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestLintBlockAndPortCoverage(t *testing.T) {
	for _, tc := range []struct {
		a, b networkingv1.IPBlock
		want bool
	}{
		{networkingv1.IPBlock{CIDR: "10.0.0.0/8"}, networkingv1.IPBlock{CIDR: "10.1.0.0/16"}, true},
		{networkingv1.IPBlock{CIDR: "10.1.0.0/16"}, networkingv1.IPBlock{CIDR: "10.0.0.0/8"}, false},
		{networkingv1.IPBlock{CIDR: "10.0.0.0/8"}, networkingv1.IPBlock{CIDR: "fd00::/8"}, false},
		{networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0/16"}}, networkingv1.IPBlock{CIDR: "10.1.0.0/16"}, false},
		{networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.1.2.0/24"}}, networkingv1.IPBlock{CIDR: "10.1.0.0/16", Except: []string{"10.1.0.0/20", "10.1.2.0/23"}}, true},
		{networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.2.0.0/16"}}, networkingv1.IPBlock{CIDR: "10.1.0.0/16"}, true},
	} {
		if got := blockCovers(&tc.a, &tc.b); got != tc.want {
			t.Errorf("blockCovers(%v, %v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
	p := func(proto string, port any, end int32) networkingv1.NetworkPolicyPort {
		out := networkingv1.NetworkPolicyPort{Protocol: lintProto(proto)}
		switch v := port.(type) {
		case int:
			out.Port = lintPort(int32(v))
		case string:
			s := intstr.FromString(v)
			out.Port = &s
		}
		if end != 0 {
			out.EndPort = &end
		}
		return out
	}
	for i, tc := range []struct {
		a, b networkingv1.NetworkPolicyPort
		want bool
	}{
		{p("TCP", nil, 0), p("TCP", 80, 0), true},
		{p("TCP", 80, 0), p("TCP", nil, 0), false},
		{p("UDP", nil, 0), p("TCP", 80, 0), false},
		{p("TCP", 80, 90), p("TCP", 85, 90), true},
		{p("TCP", 80, 90), p("TCP", 85, 91), false},
		{p("TCP", 80, 0), p("TCP", 80, 0), true},
		{p("TCP", "http", 0), p("TCP", "http", 0), true},
		{p("TCP", "http", 0), p("TCP", 80, 0), false},
		{p("TCP", 1, 65535), p("TCP", "http", 0), false},
	} {
		if got := portCovers(&tc.a, &tc.b); got != tc.want {
			t.Errorf("case %d: portCovers = %v, want %v", i, got, tc.want)
		}
	}
}

func TestFindingString(t *testing.T) {
	f := Finding{Level: LevelWarning, Namespace: "prod", Policy: "web", Check: CheckShadowedRule, Message: "m"}
	if got, want := f.String(), "warning: prod/web: shadowed-rule: m"; got != want {
		t.Errorf("%q, want %q", got, want)
	}
	_ = fmt.Sprint(f)
}

func lintProto(p string) *corev1.Protocol {
	v := corev1.Protocol(p)
	return &v
}

func lintPort(p int32) *intstr.IntOrString {
	v := intstr.FromInt32(p)
	return &v
}

// A shadowed-rule finding claims rule a allows everything rule b does. These properties check
// the claim's pieces against brute force: whenever selectorCovers / blockCovers / portCovers
// says yes, no label set, address or port matched by b escapes a.
func TestLintCoverageIsSound(t *testing.T) {
	keys, vals := []string{"a", "b"}, []string{"x", "y", "z"}
	genSelector := func(t *rapid.T, label string) *metav1.LabelSelector {
		s := &metav1.LabelSelector{}
		for i, n := 0, rapid.IntRange(0, 3).Draw(t, label+"-n"); i < n; i++ {
			key := rapid.SampledFrom(keys).Draw(t, label+"-key")
			op := rapid.SampledFrom([]metav1.LabelSelectorOperator{"In", "NotIn", "Exists", "DoesNotExist", "="}).Draw(t, label+"-op")
			if op == "=" {
				if s.MatchLabels == nil {
					s.MatchLabels = map[string]string{}
				}
				s.MatchLabels[key] = rapid.SampledFrom(vals).Draw(t, label+"-val")
				continue
			}
			r := metav1.LabelSelectorRequirement{Key: key, Operator: op}
			if op == "In" || op == "NotIn" {
				r.Values = rapid.SliceOfNDistinct(rapid.SampledFrom(vals), 1, 3, rapid.ID[string]).Draw(t, label+"-vals")
			}
			s.MatchExpressions = append(s.MatchExpressions, r)
		}
		return s
	}
	// Every label set over keys and vals (each key absent or one of the values).
	var all []labels.Set
	for _, va := range append([]string{""}, vals...) {
		for _, vb := range append([]string{""}, vals...) {
			l := labels.Set{}
			if va != "" {
				l["a"] = va
			}
			if vb != "" {
				l["b"] = vb
			}
			all = append(all, l)
		}
	}
	rapid.Check(t, func(t *rapid.T) {
		a, b := genSelector(t, "a"), genSelector(t, "b")
		if !selectorCovers(a, b) {
			return
		}
		sa, sb := selector(a), selector(b)
		for _, l := range all {
			if sb.Matches(l) && !sa.Matches(l) {
				t.Fatalf("selectorCovers(%v, %v) but %v matches only the second", a, b, l)
			}
		}
	})

	genBlock := func(t *rapid.T, label string) networkingv1.IPBlock {
		pfx := func(l string) string {
			bits := rapid.IntRange(24, 30).Draw(t, l+"-bits")
			addr := netip.AddrFrom4([4]byte{10, 0, 0, byte(rapid.IntRange(0, 255).Draw(t, l+"-host"))})
			p, _ := addr.Prefix(bits)
			return p.String()
		}
		b := networkingv1.IPBlock{CIDR: pfx(label)}
		for i, n := 0, rapid.IntRange(0, 2).Draw(t, label+"-nexcept"); i < n; i++ {
			b.Except = append(b.Except, pfx(label+"-except"))
		}
		return b
	}
	in := func(b networkingv1.IPBlock, a netip.Addr) bool {
		c := netip.MustParsePrefix(b.CIDR)
		if !c.Contains(a) {
			return false
		}
		for _, e := range b.Except {
			if netip.MustParsePrefix(e).Contains(a) {
				return false
			}
		}
		return true
	}
	rapid.Check(t, func(t *rapid.T) {
		a, b := genBlock(t, "a"), genBlock(t, "b")
		if !blockCovers(&a, &b) {
			return
		}
		for i := 0; i < 256; i++ {
			addr := netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})
			if in(b, addr) && !in(a, addr) {
				t.Fatalf("blockCovers(%v, %v) but %s is only in the second", a, b, addr)
			}
		}
	})

	genPort := func(t *rapid.T, label string) networkingv1.NetworkPolicyPort {
		p := networkingv1.NetworkPolicyPort{Protocol: lintProto(rapid.SampledFrom([]string{"TCP", "UDP"}).Draw(t, label+"-proto"))}
		switch rapid.IntRange(0, 2).Draw(t, label+"-kind") {
		case 1:
			p.Port = lintPort(int32(rapid.IntRange(1, 20).Draw(t, label+"-port")))
			if rapid.Bool().Draw(t, label+"-range") {
				end := p.Port.IntVal + int32(rapid.IntRange(0, 10).Draw(t, label+"-len"))
				p.EndPort = &end
			}
		case 2:
			v := intstr.FromString(rapid.SampledFrom([]string{"http", "dns"}).Draw(t, label+"-name"))
			p.Port = &v
		}
		return p
	}
	// A port entry's matches over a small universe: (protocol, number) plus named ports, where
	// "http" is 5 and "dns" is 7 on the destination pod.
	matches := func(p networkingv1.NetworkPolicyPort, proto string, port int32) bool {
		if string(*p.Protocol) != proto {
			return false
		}
		switch {
		case p.Port == nil:
			return true
		case p.Port.Type == intstr.String:
			return map[string]int32{"http": 5, "dns": 7}[p.Port.StrVal] == port
		}
		end := p.Port.IntVal
		if p.EndPort != nil {
			end = *p.EndPort
		}
		return p.Port.IntVal <= port && port <= end
	}
	rapid.Check(t, func(t *rapid.T) {
		a, b := genPort(t, "a"), genPort(t, "b")
		if !portCovers(&a, &b) {
			return
		}
		for _, proto := range []string{"TCP", "UDP"} {
			for port := int32(1); port <= 31; port++ {
				if matches(b, proto, port) && !matches(a, proto, port) {
					t.Fatalf("portCovers(%v, %v) but %d/%s matches only the second", a, b, port, proto)
				}
			}
		}
	})
}
