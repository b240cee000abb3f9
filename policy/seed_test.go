package policy_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/policy"
)

// The seed guide's examples, run against deploy/examples/three-tier-cluster.yaml. Every
// expectation below is written by hand from the guide's text (what each policy says it does),
// not from either evaluator, and both Compile+Decide and ReferenceDecide must meet it for every
// source x destination x port x address family, seen from every node.

const examplesDir = "../deploy/examples"

// seedEndpoint is one end of a flow: a pod of the example cluster or an address outside it.
type seedEndpoint struct {
	name string // namespace/pod, or a word for an outside address
	ns   string // "" for outside addresses
	v4   netip.Addr
	v6   netip.Addr // invalid when single-stack
	node string
}

func (e seedEndpoint) isPod() bool { return e.ns != "" }

var seedEndpoints = []seedEndpoint{
	{name: "production/frontend", ns: "production", v4: mustAddr("10.244.1.10"), v6: mustAddr("fd00:10:244::a"), node: "node-a"},
	{name: "production/backend", ns: "production", v4: mustAddr("10.244.1.11"), v6: mustAddr("fd00:10:244::b"), node: "node-a"},
	{name: "production/database", ns: "production", v4: mustAddr("10.244.2.12"), v6: mustAddr("fd00:10:244::c"), node: "node-b"},
	{name: "production/other", ns: "production", v4: mustAddr("10.244.2.13"), node: "node-b"},
	{name: "monitoring/prometheus", ns: "monitoring", v4: mustAddr("10.244.1.20"), v6: mustAddr("fd00:10:244::14"), node: "node-a"},
	{name: "kube-system/coredns", ns: "kube-system", v4: mustAddr("10.244.2.30"), v6: mustAddr("fd00:10:244::1e"), node: "node-b"},
	{name: "default/decoy", ns: "default", v4: mustAddr("10.244.1.40"), node: "node-a"},
	// Inside allow-external-db's 10.0.0.0/24.
	{name: "external-db", v4: mustAddr("10.0.0.5")},
	// Just outside it.
	{name: "external-near", v4: mustAddr("10.0.1.5")},
	{name: "internet", v4: mustAddr("192.0.2.10"), v6: mustAddr("2001:db8::10")},
}

type seedPort struct {
	proto policy.Protocol
	port  uint16
}

func (p seedPort) String() string { return fmt.Sprintf("%d/%s", p.port, p.proto) }

var (
	tcp80   = seedPort{policy.TCP, 80}
	tcp8080 = seedPort{policy.TCP, 8080}
	tcp5432 = seedPort{policy.TCP, 5432}
	udp53   = seedPort{policy.UDP, 53}
	tcp53   = seedPort{policy.TCP, 53}
	tcp9090 = seedPort{policy.TCP, 9090}
	udp8080 = seedPort{policy.UDP, 8080}
	sctp80  = seedPort{policy.SCTP, 80}
)

var seedPorts = []seedPort{tcp80, tcp8080, tcp5432, udp53, tcp53, tcp9090, udp8080, sctp80}

// seedScenario says, per direction, which pods the policies isolate and what they let through.
// Pods not isolated in a direction get no say in it.
type seedScenario struct {
	name  string
	files []string
	// egress: isolated reports whether src is isolated for egress; allowed whether the flow
	// to dst on p is admitted by some egress rule.
	egress func(src, dst seedEndpoint, p seedPort) (isolated, allowed bool)
	// ingress: likewise for dst.
	ingress func(src, dst seedEndpoint, p seedPort) (isolated, allowed bool)
}

func none(src, dst seedEndpoint, p seedPort) (bool, bool) { return false, false }

func inProduction(e seedEndpoint) bool { return e.ns == "production" }

// The example pods' labels, by name, as three-tier-cluster.yaml sets them.
func appLabel(e seedEndpoint) string {
	switch e.name {
	case "production/frontend", "default/decoy":
		return "frontend"
	case "production/backend":
		return "backend"
	case "monitoring/prometheus":
		return "prometheus"
	}
	return ""
}

func tierLabel(e seedEndpoint) string {
	switch e.name {
	case "production/frontend", "default/decoy":
		return "frontend"
	case "production/backend":
		return "backend"
	case "production/database":
		return "database"
	}
	return ""
}

func isKubeDNS(e seedEndpoint) bool { return e.name == "kube-system/coredns" }

// "Deny all ingress": every production pod is isolated for ingress and nothing is let in.
func denyIngress(src, dst seedEndpoint, p seedPort) (bool, bool) { return inProduction(dst), false }

// "Deny all egress": every production pod is isolated for egress and nothing is let out.
func denyEgress(src, dst seedEndpoint, p seedPort) (bool, bool) { return inProduction(src), false }

// allow-frontend: production pods with app=backend accept TCP 8080 from production pods with
// app=frontend (podSelector alone stays in the policy's namespace: default/decoy does not count).
func allowFrontend(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !(inProduction(dst) && appLabel(dst) == "backend") {
		return false, false
	}
	return true, inProduction(src) && appLabel(src) == "frontend" && p == tcp8080
}

// allow-from-monitoring: every production pod accepts anything from any pod in a namespace
// labelled purpose=monitoring (only "monitoring").
func allowFromMonitoring(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !inProduction(dst) {
		return false, false
	}
	return true, src.ns == "monitoring"
}

// allow-external-db: production app=backend pods may reach 10.0.0.0/24 on TCP 5432 only.
func allowExternalDB(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !(inProduction(src) && appLabel(src) == "backend") {
		return false, false
	}
	inBlock := dst.v4.IsValid() && netip.MustParsePrefix("10.0.0.0/24").Contains(dst.v4)
	return true, inBlock && p == tcp5432
}

// allow-dns: every production pod may send UDP 53 to pods labelled k8s-app=kube-dns in any
// namespace (both selectors in one peer: both must hold).
func allowDNS(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !inProduction(src) {
		return false, false
	}
	return true, isKubeDNS(dst) && p == udp53
}

// The three-tier example, ingress side.
//   - frontend (tier=frontend in production): port 80 (TCP by default) from anywhere (from: []).
//   - backend: TCP 8080 from the frontend (production, tier=frontend).
//   - database: TCP 5432 from the backend.
func threeTierIngress(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !inProduction(dst) {
		return false, false
	}
	switch tierLabel(dst) {
	case "frontend":
		return true, p == tcp80
	case "backend":
		return true, inProduction(src) && tierLabel(src) == "frontend" && p == tcp8080
	case "database":
		return true, inProduction(src) && tierLabel(src) == "backend" && p == tcp5432
	}
	return false, false
}

// The three-tier example, egress side.
//   - frontend: TCP 8080 to the backend, and UDP 53 to any pod in any namespace
//     (namespaceSelector: {} selects pods, never outside addresses).
//   - backend: TCP 5432 to the database, nothing else (the guide gives it no DNS rule).
//   - database: not isolated for egress (its policyTypes is Ingress only).
func threeTierEgress(src, dst seedEndpoint, p seedPort) (bool, bool) {
	if !inProduction(src) {
		return false, false
	}
	switch tierLabel(src) {
	case "frontend":
		toBackend := inProduction(dst) && tierLabel(dst) == "backend" && p == tcp8080
		dns := dst.isPod() && p == udp53
		return true, toBackend || dns
	case "backend":
		return true, inProduction(dst) && tierLabel(dst) == "database" && p == tcp5432
	}
	return false, false
}

// union combines policies: isolated if any isolates, allowed if any allows (policies are
// additive).
func union(fns ...func(src, dst seedEndpoint, p seedPort) (bool, bool)) func(src, dst seedEndpoint, p seedPort) (bool, bool) {
	return func(src, dst seedEndpoint, p seedPort) (bool, bool) {
		var iso, allow bool
		for _, fn := range fns {
			i, a := fn(src, dst, p)
			iso = iso || i
			allow = allow || (i && a)
		}
		return iso, allow
	}
}

var seedScenarios = []seedScenario{
	{name: "no-policies", files: nil, egress: none, ingress: none},
	{name: "default-deny-ingress", files: []string{"default-deny-ingress.yaml"}, egress: none, ingress: denyIngress},
	{name: "default-deny-egress", files: []string{"default-deny-egress.yaml"}, egress: denyEgress, ingress: none},
	{name: "default-deny-all", files: []string{"default-deny-all.yaml"}, egress: denyEgress, ingress: denyIngress},
	{name: "allow-frontend", files: []string{"allow-frontend.yaml"}, egress: none, ingress: allowFrontend},
	{name: "allow-from-monitoring", files: []string{"allow-from-monitoring.yaml"}, egress: none, ingress: allowFromMonitoring},
	{name: "allow-external-db", files: []string{"allow-external-db.yaml"}, egress: allowExternalDB, ingress: none},
	{name: "allow-dns", files: []string{"allow-dns.yaml"}, egress: allowDNS, ingress: none},
	{name: "three-tier", files: []string{"three-tier.yaml"}, egress: threeTierEgress, ingress: threeTierIngress},
	// The guide's advice taken together: start with deny-all, then allow; policies add up.
	{
		name:    "deny-all+dns+three-tier+monitoring",
		files:   []string{"default-deny-all.yaml", "allow-dns.yaml", "three-tier.yaml", "allow-from-monitoring.yaml"},
		egress:  union(denyEgress, allowDNS, threeTierEgress),
		ingress: union(denyIngress, threeTierIngress, allowFromMonitoring),
	},
	{
		name:    "deny-ingress+allow-frontend+external-db",
		files:   []string{"default-deny-ingress.yaml", "allow-frontend.yaml", "allow-external-db.yaml"},
		egress:  allowExternalDB,
		ingress: union(denyIngress, allowFrontend),
	},
}

// expectVerdict turns the per-side expectations into a verdict as sluice reports it: egress is
// judged at a local source pod, ingress at a local destination pod; an egress denial is reported
// first.
func expectVerdict(sc seedScenario, node string, src, dst seedEndpoint, p seedPort) policy.Verdict {
	local := func(e seedEndpoint) bool { return e.isPod() && (node == "" || e.node == node) }
	var eIso, eAllow, iIso, iAllow bool
	if local(src) {
		eIso, eAllow = sc.egress(src, dst, p)
	}
	if local(dst) {
		iIso, iAllow = sc.ingress(src, dst, p)
	}
	switch {
	case eIso && !eAllow:
		return policy.Verdict{Allowed: false, Reason: policy.ReasonEgress}
	case iIso && !iAllow:
		return policy.Verdict{Allowed: false, Reason: policy.ReasonIngress}
	case eIso || iIso:
		return policy.Verdict{Allowed: true, Reason: policy.ReasonRule}
	}
	return policy.Verdict{Allowed: true, Reason: policy.ReasonUnisolated}
}

func TestSeedExamples(t *testing.T) {
	for _, loader := range []struct {
		name string
		load func(testing.TB, string) *policy.State
	}{{"LoadFile", loadExample}, {"raw", decodeExampleRaw}} {
		t.Run(loader.name, func(t *testing.T) { testSeedExamples(t, loader.load) })
	}
}

func testSeedExamples(t *testing.T, load func(testing.TB, string) *policy.State) {
	cluster := load(t, "three-tier-cluster.yaml")
	if len(cluster.Pods) != 7 || len(cluster.Namespaces) != 4 || len(cluster.Policies) != 0 {
		t.Fatalf("three-tier-cluster.yaml: got %d pods, %d namespaces, %d policies; want 7, 4, 0",
			len(cluster.Pods), len(cluster.Namespaces), len(cluster.Policies))
	}
	for _, sc := range seedScenarios {
		t.Run(sc.name, func(t *testing.T) {
			st := &policy.State{Namespaces: cluster.Namespaces, Pods: cluster.Pods}
			for _, f := range sc.files {
				st.Policies = append(st.Policies, load(t, f).Policies...)
			}
			if len(sc.files) > 0 && len(st.Policies) == 0 {
				t.Fatalf("%v: no policies loaded", sc.files)
			}
			for _, node := range []string{"", "node-a", "node-b"} {
				opt := policy.Options{Node: node, Generation: 1}
				snap, err := policy.Compile(st, opt)
				if err != nil {
					t.Fatalf("Compile(node=%q): %v", node, err)
				}
				checked, failures := 0, 0
				for _, src := range seedEndpoints {
					for _, dst := range seedEndpoints {
						if src.name == dst.name {
							continue
						}
						for _, fam := range []func(seedEndpoint) netip.Addr{
							func(e seedEndpoint) netip.Addr { return e.v4 },
							func(e seedEndpoint) netip.Addr { return e.v6 },
						} {
							sa, da := fam(src), fam(dst)
							if !sa.IsValid() || !da.IsValid() {
								continue
							}
							for _, p := range seedPorts {
								flow := policy.Flow{Src: sa, Dst: da, Proto: p.proto, Port: p.port}
								want := expectVerdict(sc, node, src, dst, p)
								got := snap.Decide(flow)
								ref := policy.ReferenceDecide(st, opt, flow)
								ex := snap.Explain(flow)
								checked++
								if got != want || ref != want || ex.Allowed != want.Allowed || ex.Reason != want.Reason.String() {
									failures++
									if failures <= 20 {
										t.Errorf("node=%q %s (%s) -> %s (%s) %s: want %v/%s; Decide %v/%s, Reference %v/%s, Explain %v/%s",
											node, src.name, sa, dst.name, da, p, want.Allowed, want.Reason,
											got.Allowed, got.Reason, ref.Allowed, ref.Reason, ex.Allowed, ex.Reason)
									}
								}
							}
						}
					}
				}
				if failures > 0 {
					t.Errorf("node=%q: %d of %d flows wrong", node, failures, checked)
				}
			}
		})
	}
}

// TestSeedReference holds only the reference evaluator to the guide, so the reference is
// trusted on its own before it judges Compile.
func TestSeedReference(t *testing.T) {
	cluster := loadExample(t, "three-tier-cluster.yaml")
	total := 0
	for _, sc := range seedScenarios {
		st := &policy.State{Namespaces: cluster.Namespaces, Pods: cluster.Pods}
		for _, f := range sc.files {
			st.Policies = append(st.Policies, loadExample(t, f).Policies...)
		}
		for _, node := range []string{"", "node-a", "node-b"} {
			opt := policy.Options{Node: node}
			for _, src := range seedEndpoints {
				for _, dst := range seedEndpoints {
					if src.name == dst.name {
						continue
					}
					for _, p := range seedPorts {
						flow := policy.Flow{Src: src.v4, Dst: dst.v4, Proto: p.proto, Port: p.port}
						want := expectVerdict(sc, node, src, dst, p)
						if got := policy.ReferenceDecide(st, opt, flow); got != want {
							t.Errorf("%s node=%q %s -> %s %s: reference %v/%s, want %v/%s",
								sc.name, node, src.name, dst.name, p, got.Allowed, got.Reason, want.Allowed, want.Reason)
						}
						total++
					}
				}
			}
		}
	}
	t.Logf("%d flows checked", total)
}

// TestSeedSpotChecks restates a few sentences of the guide directly, so that a mistake in the
// expectation tables above cannot hide a mistake in both evaluators.
func TestSeedSpotChecks(t *testing.T) {
	cluster := loadExample(t, "three-tier-cluster.yaml")
	st := &policy.State{Namespaces: cluster.Namespaces, Pods: cluster.Pods}
	st.Policies = append(st.Policies, loadExample(t, "three-tier.yaml").Policies...)
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ep := map[string]seedEndpoint{}
	for _, e := range seedEndpoints {
		ep[e.name] = e
	}
	cases := []struct {
		src, dst string
		p        seedPort
		allowed  bool
	}{
		{"internet", "production/frontend", tcp80, true},
		{"internet", "production/frontend", tcp8080, false},
		{"production/frontend", "production/backend", tcp8080, true},
		{"production/frontend", "production/backend", tcp80, false},
		{"default/decoy", "production/backend", tcp8080, false},
		{"production/other", "production/backend", tcp8080, false},
		{"production/backend", "production/database", tcp5432, true},
		{"production/frontend", "production/database", tcp5432, false},
		{"production/frontend", "kube-system/coredns", udp53, true},
		{"production/frontend", "kube-system/coredns", tcp53, false},
		{"production/frontend", "internet", udp53, false},
		{"production/backend", "kube-system/coredns", udp53, false},
		{"production/database", "internet", tcp80, true},
		{"production/database", "production/backend", tcp8080, false},
	}
	for _, c := range cases {
		s, d := ep[c.src], ep[c.dst]
		f := policy.Flow{Src: s.v4, Dst: d.v4, Proto: c.p.proto, Port: c.p.port}
		if got := snap.Decide(f); got.Allowed != c.allowed {
			t.Errorf("%s -> %s %s: Decide allowed=%v, want %v", c.src, c.dst, c.p, got.Allowed, c.allowed)
		}
		if got := policy.ReferenceDecide(st, policy.Options{}, f); got.Allowed != c.allowed {
			t.Errorf("%s -> %s %s: Reference allowed=%v, want %v", c.src, c.dst, c.p, got.Allowed, c.allowed)
		}
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// loadExample reads a file of deploy/examples with the project's loader (defaulted, validated).
func loadExample(t testing.TB, name string) *policy.State {
	t.Helper()
	path := filepath.Join(examplesDir, name)
	st, _, err := policy.LoadFile(path)
	if err != nil {
		t.Fatalf("LoadFile(%s): %v", path, err)
	}
	return st
}

// decodeExampleRaw decodes the three kinds itself with a plain multi-document split and no
// defaulting, so the seed behaviour is also checked on exactly what the files say (Compile and
// the reference must default by themselves).
func decodeExampleRaw(t testing.TB, name string) *policy.State {
	t.Helper()
	path := filepath.Join(examplesDir, name)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return decodeStateYAML(t, path, data)
}

func mustStrict(t testing.TB, path string, i int, doc []byte, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, into); err != nil {
		t.Fatalf("%s document %d: %v", path, i, err)
	}
}

// splitYAMLDocs splits on lines that are exactly "---".
func splitYAMLDocs(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	for _, line := range strings.SplitAfter(string(data), "\n") {
		if strings.TrimRight(line, " \r\n") == "---" {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.WriteString(line)
	}
	return append(docs, cur.Bytes())
}
