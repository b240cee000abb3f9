package policy

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Each case is one bad object placed as document 2 of a file (after a namespace); the error must
// name the file, the document, the kind, namespace/name and the field path.
func TestValidateRejects(t *testing.T) {
	const head = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n---\n"
	policy := func(spec string) string {
		return "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n" + spec
	}
	pod := func(body string) string {
		return "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod}\n" + body
	}
	const npWhere = "state.yaml: document 2 (NetworkPolicy prod/np, line 5): "
	const podWhere = "state.yaml: document 2 (Pod prod/web, line 5): "
	for _, tc := range []struct {
		name, doc, want string
	}{
		{"In without values", policy("  podSelector: {matchExpressions: [{key: app, operator: In}]}\n"),
			npWhere + "spec.podSelector.matchExpressions[0].values: Required value"},
		{"NotIn without values", policy("  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: []}]}\n"),
			npWhere + "spec.podSelector.matchExpressions[0].values: Required value"},
		{"Exists with values", policy("  podSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}\n"),
			npWhere + "spec.podSelector.matchExpressions[0].values: Forbidden"},
		{"DoesNotExist with values", policy("  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: app, operator: DoesNotExist, values: [a]}]}}]}]\n"),
			npWhere + "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values: Forbidden"},
		{"unknown operator", policy("  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}\n"),
			npWhere + `spec.podSelector.matchExpressions[0].operator: Invalid value: "Equals"`},
		{"bad label key", policy("  podSelector: {matchLabels: {\"-app\": web}}\n"),
			npWhere + `spec.podSelector.matchLabels: Invalid value: "-app"`},
		{"bad label value", policy("  podSelector: {}\n  egress: [{to: [{podSelector: {matchLabels: {app: \"web server\"}}}]}]\n"),
			npWhere + `spec.egress[0].to[0].podSelector.matchLabels: Invalid value: "web server"`},
		{"bad expression value", policy("  podSelector: {matchExpressions: [{key: app, operator: In, values: [\"a b\"]}]}\n"),
			npWhere + `spec.podSelector.matchExpressions[0].values[0]: Invalid value: "a b"`},
		{"CIDR prefix too long", policy("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/33]}}]}]\n"),
			npWhere + `spec.ingress[0].from[1].ipBlock.except[0]: Invalid value: "10.0.0.0/33": is not a valid CIDR`},
		{"CIDR garbage", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0/8}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.cidr: Invalid value: "10.0.0/8": is not a valid CIDR`},
		{"CIDR host bits", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.1/8}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.cidr: Invalid value: "10.0.0.1/8": has bits set past the prefix length; did you mean 10.0.0.0/8?`},
		{"CIDR missing", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {except: [10.0.0.0/9]}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.cidr: Required value`},
		{"except outside", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.except[0]: Invalid value: "11.0.0.0/16": must be a strict subset of cidr 10.0.0.0/8`},
		{"except equal", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.except[0]: Invalid value: "10.0.0.0/8": must be a strict subset`},
		{"except other family", policy("  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [\"fd00::/64\"]}}]}]\n"),
			npWhere + `spec.egress[0].to[0].ipBlock.except[0]: Invalid value: "fd00::/64": is not of the same IP family`},
		{"ipBlock with selector", policy("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n"),
			npWhere + `spec.ingress[0].from[0]: Forbidden: ipBlock cannot be combined`},
		{"empty peer", policy("  podSelector: {}\n  ingress: [{from: [{}]}]\n"),
			npWhere + `spec.ingress[0].from[0]: Required value`},
		{"port zero", policy("  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n"),
			npWhere + `spec.ingress[0].ports[0].port: Invalid value: 0: must be between 1 and 65535`},
		{"port too big", policy("  podSelector: {}\n  ingress: [{ports: [{port: 65536}]}]\n"),
			npWhere + `spec.ingress[0].ports[0].port: Invalid value: 65536`},
		{"endPort below port", policy("  podSelector: {}\n  ingress: [{ports: [{port: 8080, endPort: 80}]}]\n"),
			npWhere + "spec.ingress[0].ports[0].endPort: Invalid value: 80: must be greater than or equal to `port` (8080)"},
		{"endPort too big", policy("  podSelector: {}\n  ingress: [{ports: [{port: 8080, endPort: 70000}]}]\n"),
			npWhere + "spec.ingress[0].ports[0].endPort: Invalid value: 70000: must be between 1 and 65535"},
		{"endPort with named port", policy("  podSelector: {}\n  ingress: [{ports: [{port: http, endPort: 90}]}]\n"),
			npWhere + "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is a name"},
		{"endPort without port", policy("  podSelector: {}\n  ingress: [{ports: [{endPort: 90}]}]\n"),
			npWhere + "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified without `port`"},
		{"bad named port", policy("  podSelector: {}\n  egress: [{ports: [{port: web_http}]}]\n"),
			npWhere + `spec.egress[0].ports[0].port: Invalid value: "web_http"`},
		{"named port digits only", policy("  podSelector: {}\n  egress: [{ports: [{port: \"80\"}]}]\n"),
			npWhere + `spec.egress[0].ports[0].port: Invalid value: "80": must contain at least one letter`},
		{"named port too long", policy("  podSelector: {}\n  egress: [{ports: [{port: abcdefghijklmnop}]}]\n"),
			npWhere + `spec.egress[0].ports[0].port: Invalid value: "abcdefghijklmnop": must be no more than 15 characters`},
		{"protocol", policy("  podSelector: {}\n  egress: [{ports: [{port: 80, protocol: ICMP}]}]\n"),
			npWhere + `spec.egress[0].ports[0].protocol: Unsupported value: "ICMP"`},
		{"protocol lowercase", policy("  podSelector: {}\n  egress: [{ports: [{port: 80, protocol: tcp}]}]\n"),
			npWhere + `spec.egress[0].ports[0].protocol: Unsupported value: "tcp"`},
		{"policyTypes", policy("  podSelector: {}\n  policyTypes: [Ingress, egress]\n"),
			npWhere + `spec.policyTypes[1]: Unsupported value: "egress"`},
		{"too many policyTypes", policy("  podSelector: {}\n  policyTypes: [Ingress, Egress, Ingress]\n"),
			npWhere + `spec.policyTypes: Too many`},
		{"policy name", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name, namespace: prod}\nspec: {podSelector: {}}\n",
			`state.yaml: document 2 (NetworkPolicy prod/Bad_Name, line 5): metadata.name: Invalid value: "Bad_Name"`},
		{"policy without name", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: prod}\nspec: {podSelector: {}}\n",
			`state.yaml: document 2 (NetworkPolicy, line 5): metadata.name: Required value`},
		{"pod IP", pod("status: {podIP: 10.0.0.256}\n"),
			podWhere + `status.podIP: Invalid value: "10.0.0.256": is not a valid IP address`},
		{"pod IP leading zero", pod("status: {podIPs: [{ip: 10.0.0.01}]}\n"),
			podWhere + `status.podIPs[0].ip: Invalid value: "10.0.0.01"`},
		{"pod IP mapped", pod("status: {podIPs: [{ip: \"::ffff:10.0.0.1\"}]}\n"),
			podWhere + `status.podIPs[0].ip: Invalid value: "::ffff:10.0.0.1": must not be an IPv4-mapped`},
		{"pod IPs same family", pod("status: {podIPs: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]}\n"),
			podWhere + `status.podIPs[1].ip: Invalid value: "10.0.0.2": a pod has at most one IP per family`},
		{"podIPs disagree with podIP", pod("status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}]}\n"),
			podWhere + `status.podIPs[0].ip: Invalid value: "10.0.0.2": must equal status.podIP (10.0.0.1)`},
		{"container port", pod("spec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n"),
			podWhere + `spec.containers[0].ports[0].containerPort: Invalid value: 0`},
		{"container port name", pod("spec: {containers: [{name: c, ports: [{containerPort: 80, name: HTTP}]}]}\n"),
			podWhere + `spec.containers[0].ports[0].name: Invalid value: "HTTP"`},
		{"container port duplicate name", pod("spec: {containers: [{name: c, ports: [{containerPort: 80, name: http}, {containerPort: 81, name: http}]}]}\n"),
			podWhere + `spec.containers[0].ports[1].name: Duplicate value: "http"`},
		{"container port protocol", pod("spec: {initContainers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]}\n"),
			podWhere + `spec.initContainers[0].ports[0].protocol: Unsupported value: "ICMP"`},
		{"pod label", "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod, labels: {app: \"-x\"}}\n",
			podWhere + `metadata.labels: Invalid value: "-x"`},
		{"namespace name", "apiVersion: v1\nkind: Namespace\nmetadata: {name: Prod}\n",
			`state.yaml: document 2 (Namespace Prod, line 5): metadata.name: Invalid value: "Prod"`},
		{"pod namespace name", "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod.x}\n",
			`state.yaml: document 2 (Pod prod.x/web, line 5): metadata.namespace: Invalid value: "prod.x"`},
		{"duplicate namespace", "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n",
			`state.yaml: document 2 (Namespace prod, line 5): metadata.name: Invalid value: "prod": is already defined by state.yaml: document 1 (Namespace prod, line 1)`},
		{"duplicate policy in list", "apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(policy("  podSelector: {}\n"), "\n", "\n  ") + "\n- " + strings.ReplaceAll(policy("  podSelector: {}\n"), "\n", "\n  "),
			`state.yaml: document 2 items[1] (NetworkPolicy prod/np): metadata.name: Invalid value: "np": is already defined by state.yaml: document 2 items[0] (NetworkPolicy prod/np)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, _, err := Load(strings.NewReader(head+tc.doc), "state.yaml")
			if err == nil {
				t.Fatalf("accepted (state %+v)", st)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error:\n%s\nwant it to contain:\n%s", err, tc.want)
			}
		})
	}
}

// What the API server accepts must load: a guard against validation stricter than the spec.
func TestValidateAccepts(t *testing.T) {
	in := `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: everything, namespace: prod, labels: {app.kubernetes.io/name: x}}
spec:
  podSelector:
    matchLabels: {app: web, example.com/tier: front-end}
    matchExpressions:
    - {key: env, operator: In, values: [prod, staging]}
    - {key: canary, operator: DoesNotExist}
    - {key: team, operator: Exists}
    - {key: zone, operator: NotIn, values: [""]}
  policyTypes: [Ingress, Egress]
  ingress:
  - {}
  - from: []
    ports: []
  - from:
    - podSelector: {}
    - namespaceSelector: {}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
      podSelector: {matchLabels: {app: prometheus}}
    - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 10.1.0.0/16]}
    - ipBlock: {cidr: "::/0", except: ["fd00::/8"]}
    - ipBlock: {cidr: 192.168.1.7/32}
    ports:
    - {port: 80}
    - {port: http, protocol: TCP}
    - {port: 32000, endPort: 32768, protocol: UDP}
    - {port: 5000, endPort: 5000}
    - {protocol: SCTP}
    - {port: 65535}
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{port: 5432, protocol: TCP}]
  - ports: [{port: dns, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0.canary, namespace: prod, labels: {app: web}}
spec:
  containers:
  - {name: a, image: x, ports: [{containerPort: 80, name: http}, {containerPort: 53, name: dns, protocol: UDP}]}
  - {name: b, image: x, ports: [{containerPort: 81, name: http}]}
status: {phase: Running, podIPs: [{ip: 10.244.0.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0.canary, namespace: other}
`
	st, _, err := Load(strings.NewReader(in), "ok.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Policies) != 1 || len(st.Pods) != 2 {
		t.Fatalf("loaded %d policies, %d pods", len(st.Policies), len(st.Pods))
	}
}

// Validate works on a State built in code too, naming kind and namespace/name.
func TestValidateInMemory(t *testing.T) {
	st := &State{Pods: []corev1.Pod{
		{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "x"}, Status: corev1.PodStatus{PodIP: "nope"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "x"}},
	}}
	err := Validate(st)
	if err == nil {
		t.Fatal("no error")
	}
	for _, w := range []string{`Pod x/a: status.podIP: Invalid value: "nope"`, `Pod x/a: metadata.name: Invalid value: "a": is already defined by Pod x/a`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
	if err := Validate(&State{}); err != nil {
		t.Errorf("empty state: %v", err)
	}
}

func TestValidateCapsErrorCount(t *testing.T) {
	var b strings.Builder
	for i := 0; i < 2*maxReportedErrors; i++ {
		b.WriteString("---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nstatus: {podIP: bad}\n")
	}
	_, _, err := Load(strings.NewReader(b.String()), "many.yaml")
	if err == nil {
		t.Fatal("no error")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) > maxReportedErrors+1 || !strings.Contains(lines[len(lines)-1], "more problems not shown") {
		t.Errorf("%d lines, last %q: want at most %d and a 'more problems' line", len(lines), lines[len(lines)-1], maxReportedErrors+1)
	}
}
