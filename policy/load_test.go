package policy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"
)

func TestLoadMultiDocument(t *testing.T) {
	st, notes, err := LoadFile("testdata/three-tier.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(notes) != 0 {
		t.Errorf("unexpected notes: %q", notes)
	}
	if got := [3]int{len(st.Namespaces), len(st.Pods), len(st.Policies)}; got != [3]int{3, 5, 3} {
		t.Fatalf("namespaces, pods, policies = %v, want [3 5 3]", got)
	}
	names := map[string]bool{}
	for _, np := range st.Policies {
		names[np.Namespace+"/"+np.Name] = true
	}
	for _, want := range []string{"production/frontend-policy", "production/backend-policy", "production/database-policy"} {
		if !names[want] {
			t.Errorf("policy %s not loaded (have %v)", want, names)
		}
	}
	// An explicit empty List is an empty state; input without any document is an error.
	if st, _, err := Load(strings.NewReader("apiVersion: v1\nkind: List\nitems: []\n"), "none.yaml"); err != nil || len(st.Pods)+len(st.Namespaces)+len(st.Policies) != 0 {
		t.Errorf("empty List: %v, %+v", err, st)
	}
	if _, _, err := Load(strings.NewReader(""), "empty.yaml"); err == nil {
		t.Error("empty input loaded as an empty state")
	}
	// The comment-only document between the pods and the policies must not count.
	if _, _, err := Load(strings.NewReader("# only a comment\n---\n---\n"), "empty.yaml"); err == nil || !strings.Contains(err.Error(), "no objects") {
		t.Errorf("comment-only input: err = %v, want a 'no objects' error", err)
	}
}

func TestLoadDefaulting(t *testing.T) {
	st, _, err := LoadFile("testdata/three-tier.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range st.Namespaces {
		if ns.Labels[corev1.LabelMetadataName] != ns.Name {
			t.Errorf("namespace %s: labels %v lack %s=%s", ns.Name, ns.Labels, corev1.LabelMetadataName, ns.Name)
		}
	}
	for _, np := range st.Policies {
		// Every ingress port in the file omits the protocol.
		for _, r := range np.Spec.Ingress {
			for _, p := range r.Ports {
				if p.Protocol == nil || *p.Protocol != corev1.ProtocolTCP {
					t.Errorf("%s: ingress port %v: protocol not defaulted to TCP", np.Name, p.Port)
				}
			}
		}
		for _, r := range np.Spec.Egress {
			for _, p := range r.Ports {
				if p.Protocol == nil {
					t.Errorf("%s: egress port %v: protocol not defaulted", np.Name, p.Port)
				}
			}
		}
	}
	for _, p := range st.Pods {
		if p.Status.PodIP == "" || len(p.Status.PodIPs) == 0 || p.Status.PodIPs[0].IP != p.Status.PodIP {
			t.Errorf("pod %s: podIP %q podIPs %v not defaulted from each other", p.Name, p.Status.PodIP, p.Status.PodIPs)
		}
		for _, c := range p.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Protocol == "" {
					t.Errorf("pod %s: container port %d without protocol", p.Name, cp.ContainerPort)
				}
			}
		}
	}

	// policyTypes defaulting, including the `egress: []` case the API server cannot tell apart.
	const doc = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: %s}
spec:
  podSelector: {}
%s`
	for _, tc := range []struct {
		name, body string
		want       []networkingv1.PolicyType
	}{
		{"no-rules", "", []networkingv1.PolicyType{"Ingress"}},
		{"ingress-only", "  ingress: [{}]\n", []networkingv1.PolicyType{"Ingress"}},
		{"egress-rules", "  egress: [{}]\n", []networkingv1.PolicyType{"Ingress", "Egress"}},
		{"empty-egress", "  egress: []\n", []networkingv1.PolicyType{"Ingress"}},
		{"explicit", "  policyTypes: [Egress]\n", []networkingv1.PolicyType{"Egress"}},
	} {
		st, _, err := Load(strings.NewReader(strings.Replace(strings.Replace(doc, "%s", tc.name, 1), "%s", tc.body, 1)), tc.name)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		np := st.Policies[0]
		if np.Namespace != "default" {
			t.Errorf("%s: namespace %q, want default", tc.name, np.Namespace)
		}
		if strings.Join(typesOf(np.Spec.PolicyTypes), ",") != strings.Join(typesOf(tc.want), ",") {
			t.Errorf("%s: policyTypes %v, want %v", tc.name, np.Spec.PolicyTypes, tc.want)
		}
	}
}

func typesOf(ts []networkingv1.PolicyType) []string {
	var out []string
	for _, t := range ts {
		out = append(out, string(t))
	}
	return out
}

func TestLoadKubectlList(t *testing.T) {
	st, notes, err := LoadFile("testdata/kubectl-list.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := [3]int{len(st.Namespaces), len(st.Pods), len(st.Policies)}; got != [3]int{2, 2, 1} {
		t.Fatalf("namespaces, pods, policies = %v, want [2 2 1]", got)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "Service") || !strings.Contains(notes[0], "items[4]") {
		t.Errorf("notes = %q, want one naming the ignored Service at items[4]", notes)
	}
	web := st.Pods[0]
	if web.Name != "web-7d9f8b6c5d-x2x9q" || len(web.Status.PodIPs) != 2 || web.Status.PodIPs[1].IP != "fd00:10:244:1::7" {
		t.Errorf("dual-stack pod not read: %+v", web.Status)
	}
	if len(web.ManagedFields) != 1 || web.ResourceVersion != "123456" {
		t.Errorf("metadata not kept: managedFields %d, resourceVersion %q", len(web.ManagedFields), web.ResourceVersion)
	}
	if ns := st.Namespaces[1]; ns.Labels[corev1.LabelMetadataName] != "kube-system" {
		t.Errorf("namespace kube-system not labelled: %v", ns.Labels)
	}
}

func TestLoadTypedLists(t *testing.T) {
	// The API server's own list format: items carry neither apiVersion nor kind.
	in := `apiVersion: networking.k8s.io/v1
kind: NetworkPolicyList
metadata: {resourceVersion: "5"}
items:
- metadata: {name: a, namespace: x}
  spec: {podSelector: {}}
- metadata: {name: b, namespace: x}
  spec: {podSelector: {}, policyTypes: [Egress]}
---
apiVersion: v1
kind: PodList
items:
- metadata: {name: p, namespace: x}
  status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: NamespaceList
items:
- metadata: {name: x}
---
apiVersion: v1
kind: ServiceList
items: []
`
	st, notes, err := Load(strings.NewReader(in), "lists.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := [3]int{len(st.Namespaces), len(st.Pods), len(st.Policies)}; got != [3]int{1, 1, 2} {
		t.Fatalf("namespaces, pods, policies = %v, want [1 1 2]", got)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "ServiceList") {
		t.Errorf("notes = %q, want the ServiceList named", notes)
	}

	// A typed list may hold only its own kind.
	_, _, err = Load(strings.NewReader("apiVersion: v1\nkind: PodList\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n"), "mixed.yaml")
	if err == nil || !strings.Contains(err.Error(), "mixed.yaml: document 1 items[0] (Namespace x): a PodList may hold only Pod objects") {
		t.Errorf("mixed typed list: err = %v", err)
	}
}

func TestLoadOtherKindsNoted(t *testing.T) {
	in := `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {whatever: [1, 2]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
`
	st, notes, err := Load(strings.NewReader(in), "mix.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Namespaces) != 1 {
		t.Errorf("namespaces = %d, want 1", len(st.Namespaces))
	}
	joined := strings.Join(notes, "\n")
	for _, want := range []string{"ignored 1 Deployment", "document 1 (Deployment shop/web, line 1)", "ignored 2 Service", "document 2 (Service shop/web, line 6)"} {
		if !strings.Contains(joined, want) {
			t.Errorf("notes %q lack %q", joined, want)
		}
	}
}

func TestLoadStrictDecoding(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string
	}{
		{"unknown field", `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: prod}
spec:
  podSelectr: {}
`, []string{"f.yaml: document 1 (NetworkPolicy prod/np, line 1)", `unknown field "spec.podSelectr"`}},
		{"case matters", `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: prod}
spec:
  podselector: {}
`, []string{`unknown field "spec.podselector"`}},
		{"duplicate key", `apiVersion: v1
kind: Namespace
metadata: {name: a}
metadata: {name: b}
`, []string{"f.yaml: document 1", "line 4", "already set"}},
		{"wrong type", `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - ports:
    - endPort: "x"
`, []string{"(NetworkPolicy prod/np, line 1)", "endPort"}},
		{"missing kind", "apiVersion: v1\nmetadata: {name: a}\n", []string{"document 1", "kind is required"}},
		{"old apiVersion", "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: a}\n", []string{"(NetworkPolicy a, line 1)", "extensions/v1beta1", "networking.k8s.io/v1"}},
		{"not a mapping", "- a\n- b\n", []string{"document 1", "expected a Kubernetes object"}},
		{"bad yaml line in second document", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b\n", []string{"document 2", "line 5", "invalid YAML"}},
		{"nested list", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n", []string{"document 1 items[0]", "List inside a List"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Load(strings.NewReader(tc.in), "f.yaml")
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestLoadCollectsEveryError(t *testing.T) {
	in := `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a, namespace: x}
spec:
  podSelectr: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/33}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: x}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In}]}
`
	_, _, err := Load(strings.NewReader(in), "f.yaml")
	if err == nil {
		t.Fatal("no error")
	}
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) {
		t.Fatalf("error is not a joined list: %T", err)
	}
	msg := err.Error()
	for _, w := range []string{`unknown field "spec.podSelectr"`, "spec.ingress[0].from[0].ipBlock.cidr", "spec.podSelector.matchExpressions[0].values"} {
		if !strings.Contains(msg, w) {
			t.Errorf("error lacks %q:\n%s", w, msg)
		}
	}
}

func TestLoadNotesDuplicateIPsAndMissingNamespaces(t *testing.T) {
	in := `apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: a}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: b}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: a}
status: {podIP: 10.0.0.1, phase: Succeeded}
`
	_, notes, err := Load(strings.NewReader(in), "f.yaml")
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(notes, "\n")
	for _, w := range []string{"document 3 (Pod b/p2, line 10)", "IP 10.0.0.1 is also the IP of f.yaml: document 2 (Pod a/p1", "namespace(s) b are used but not defined"} {
		if !strings.Contains(joined, w) {
			t.Errorf("notes lack %q:\n%s", w, joined)
		}
	}
	if strings.Contains(joined, "done") {
		t.Errorf("a finished pod's IP was reported as a duplicate:\n%s", joined)
	}
}

// The example policies other engineers keep under deploy/examples must load cleanly.
func TestLoadDeployExamples(t *testing.T) {
	files, _ := filepath.Glob("../deploy/examples/*.yaml")
	if len(files) == 0 {
		t.Skip("no deploy/examples/*.yaml yet")
	}
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			continue
		}
		if _, _, err := LoadFile(f); err != nil {
			t.Errorf("%v", err)
		}
	}
}

// genStateYAML writes a kubectl-like state of pods pods and policies policies as multi-document
// YAML, for BenchmarkLoad.
func genStateYAML(pods, policies int) []byte {
	var b strings.Builder
	nss := max(1, policies/20)
	for n := 0; n < nss; n++ {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-%d\n  labels: {team: t%d}\n", n, n%7)
	}
	for i := 0; i < pods; i++ {
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: pod-%d
  namespace: ns-%d
  labels: {app: app-%d, tier: t%d}
  resourceVersion: "%d"
spec:
  nodeName: node-%d
  containers:
  - name: c
    image: img
    ports:
    - {name: http, containerPort: 8080}
status:
  phase: Running
  podIP: 10.%d.%d.%d
  podIPs: [{ip: 10.%d.%d.%d}]
`, i, i%nss, i%50, i%3, i, i%10, i>>16&255, i>>8&255, i&255, i>>16&255, i>>8&255, i&255)
	}
	for i := 0; i < policies; i++ {
		fmt.Fprintf(&b, `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np-%d, namespace: ns-%d}
spec:
  podSelector: {matchLabels: {app: app-%d}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: tier, operator: In, values: [t0, t1]}]}
    - namespaceSelector: {matchLabels: {team: t%d}}
    - ipBlock: {cidr: 172.16.0.0/12, except: [172.16.1.0/24]}
    ports: [{port: 8080}, {port: http}, {port: 9000, endPort: 9100, protocol: UDP}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: 53, protocol: UDP}]
`, i, i%nss, i%50, i%7)
	}
	return []byte(b.String())
}

// BenchmarkLoad times reading, defaulting and validating a state file (the file source re-reads
// it on every change).
func BenchmarkLoad(b *testing.B) {
	for _, n := range []int{100, 1000} {
		data := genStateYAML(5*n, n)
		b.Run(fmt.Sprintf("policies=%d,pods=%d", n, 5*n), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, _, err := Load(bytes.NewReader(data), "bench.yaml"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// kubectl get -o json output takes the JSON path; it must read the same and stay strict.
func TestLoadJSON(t *testing.T) {
	y, err := os.ReadFile("testdata/kubectl-list.yaml")
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	st, notes, err := Load(bytes.NewReader(j), "dump.json")
	if err != nil {
		t.Fatal(err)
	}
	if got := [3]int{len(st.Namespaces), len(st.Pods), len(st.Policies)}; got != [3]int{2, 2, 1} || len(notes) != 1 {
		t.Errorf("namespaces, pods, policies = %v, notes %q", got, notes)
	}
	for _, tc := range []struct{ in, want string }{
		{`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"},"metadata":{"name":"b"}}`, `duplicate field "metadata"`},
		{`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a","labelz":{}}}`, `unknown field "metadata.labelz"`},
	} {
		if _, _, err := Load(strings.NewReader(tc.in), "x.json"); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.in, err, tc.want)
		}
	}
}

// FuzzLoad: Load never panics, and whatever it accepts compiles: validation is what stands
// between a file and the engine, so a state that passes it and still fails Compile (or a
// state Compile would silently misread) is a bug in one of the two.
//
//	go test ./policy -run '^$' -fuzz FuzzLoad -fuzztime 60s
func FuzzLoad(f *testing.F) {
	for _, name := range []string{"testdata/three-tier.yaml", "testdata/kubectl-list.yaml", "testdata/lint.yaml"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: In, values: [b]}]}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, endPort: 90}, {port: http, protocol: SCTP}]}]\n"))
	f.Add([]byte("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIPs: [{ip: \"fd00::1\"}]}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, _, err := Load(bytes.NewReader(data), "fuzz.yaml")
		if err != nil {
			if st != nil {
				t.Fatalf("error with a state: %v", err)
			}
			return
		}
		if _, err := Compile(st, Options{}); err != nil {
			t.Fatalf("Load accepted what Compile rejects: %v\n%s", err, data)
		}
		Lint(st)
	})
}
