package policy_test

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/policy"
)

// Spec pins: one sentence of the NetworkPolicy specification (or of sluice's documented
// choices) per case, with the verdicts it implies written by hand. The reference must meet
// them on its own, since the differential test trusts it; Decide is held to them as well.

const specCluster = `
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web, tier: front}}
spec:
  nodeName: n1
  containers:
  - name: c
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
status: {phase: Running, podIP: 10.1.0.10, podIPs: [{ip: 10.1.0.10}, {ip: "fd00:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec:
  nodeName: n2
  containers:
  - name: c
    ports:
    - {name: http, containerPort: 9000, protocol: TCP}
status: {phase: Running, podIP: 10.1.0.11, podIPs: [{ip: 10.1.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bare, namespace: prod}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.1.0.12, podIPs: [{ip: 10.1.0.12}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: dev, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.2.0.10, podIPs: [{ip: 10.2.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: ghost, labels: {app: tool}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.3.0.10, podIPs: [{ip: 10.3.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: prod, labels: {app: web}}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c}]}
status: {phase: Running, podIP: 10.1.0.99, podIPs: [{ip: 10.1.0.99}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: prod, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Succeeded, podIP: 10.1.0.98, podIPs: [{ip: 10.1.0.98}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: prod, labels: {app: legacy}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.1.0.13}
---
apiVersion: v1
kind: Pod
metadata: {name: b-dup, namespace: prod, labels: {app: second}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.1.0.50, podIPs: [{ip: 10.1.0.50}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a-dup, namespace: prod, labels: {app: first}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIP: 10.1.0.50, podIPs: [{ip: 10.1.0.50}]}
`

// Addresses by name; pods by namespace/name (their first address).
var specAddr = map[string]string{
	"prod/web": "10.1.0.10", "prod/web6": "fd00:1::10", "prod/api": "10.1.0.11", "prod/bare": "10.1.0.12",
	"dev/web": "10.2.0.10", "ghost/tool": "10.3.0.10", "prod/hostnet": "10.1.0.99", "prod/done": "10.1.0.98",
	"prod/legacy": "10.1.0.13", "prod/dup": "10.1.0.50",
	"ext": "192.0.2.1", "ext6": "2001:db8::1", "ext6b": "2001:db8:0:1::1", "db": "10.0.0.5", "db-except": "10.0.0.200",
}

type specCheck struct {
	src, dst string
	port     string // "8080/TCP"; "ICMP" for proto 1
	node     string
	want     string // "unisolated", "rule", "egress-denied", "ingress-denied"
}

var specCases = []struct {
	name     string
	policies string
	checks   []specCheck
}{
	{
		name: "matchExpressions NotIn selects pods without the key; DoesNotExist too",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector:
    matchExpressions:
    - {key: app, operator: NotIn, values: [api]}
    - {key: tier, operator: DoesNotExist}
  policyTypes: [Ingress]`,
		checks: []specCheck{
			{src: "ext", dst: "prod/bare", port: "80/TCP", want: "ingress-denied"},   // no app, no tier
			{src: "ext", dst: "prod/legacy", port: "80/TCP", want: "ingress-denied"}, // app=legacy
			{src: "ext", dst: "prod/api", port: "80/TCP", want: "unisolated"},        // app=api
			{src: "ext", dst: "prod/web", port: "80/TCP", want: "unisolated"},        // has tier
		},
	},
	{
		name: "matchLabels and In/Exists are ANDed",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions:
    - {key: tier, operator: In, values: [front, back]}
    - {key: tier, operator: Exists}
  ingress: []`,
		checks: []specCheck{
			{src: "ext", dst: "prod/web", port: "80/TCP", want: "ingress-denied"},
			{src: "ext", dst: "dev/web", port: "80/TCP", want: "unisolated"}, // other namespace
			{src: "ext", dst: "prod/api", port: "80/TCP", want: "unisolated"},
		},
	},
	{
		name: "policyTypes omitted: Ingress always, Egress only with egress rules (egress: [] is none)",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: []`,
		checks: []specCheck{
			{src: "prod/web", dst: "ext", port: "80/TCP", want: "unisolated"},
			{src: "ext", dst: "prod/web", port: "80/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "policyTypes omitted with egress rules: both directions",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress:
  - ports: [{port: 443}]`,
		checks: []specCheck{
			{src: "prod/web", dst: "ext", port: "443/TCP", want: "rule"},
			{src: "prod/web", dst: "ext", port: "443/UDP", want: "egress-denied"},
			{src: "prod/web", dst: "ext", port: "80/TCP", want: "egress-denied"},
			{src: "ext", dst: "prod/web", port: "443/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "explicit policyTypes [Ingress] ignores egress rules",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - {}
  egress:
  - ports: [{port: 443}]`,
		checks: []specCheck{
			{src: "prod/web", dst: "ext", port: "80/TCP", want: "unisolated"},
			{src: "ext", dst: "prod/web", port: "1/UDP", want: "rule"}, // a rule with nothing: all
			{src: "ext", dst: "prod/web", port: "ICMP", want: "rule"},
		},
	},
	{
		name: "a rule without from admits every source on its ports; ports without protocol are TCP",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: 80}]`,
		checks: []specCheck{
			{src: "ext", dst: "prod/web", port: "80/TCP", want: "rule"},
			{src: "dev/web", dst: "prod/api", port: "80/TCP", want: "rule"},
			{src: "ext", dst: "prod/web", port: "80/UDP", want: "ingress-denied"},
			{src: "ext", dst: "prod/web", port: "ICMP", want: "ingress-denied"},
			{src: "ext6", dst: "prod/web6", port: "80/TCP", want: "rule"},
		},
	},
	{
		name: "namespaceSelector and podSelector in one peer are ANDed; in two peers ORed",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: and, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {env: dev}}
      podSelector: {matchLabels: {app: web}}
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: or, namespace: prod}
spec:
  podSelector: {matchLabels: {app: legacy}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {env: dev}}
    - podSelector: {matchLabels: {app: web}}`,
		checks: []specCheck{
			{src: "dev/web", dst: "prod/api", port: "80/TCP", want: "rule"},
			{src: "prod/web", dst: "prod/api", port: "80/TCP", want: "ingress-denied"}, // right pod, wrong namespace
			{src: "ghost/tool", dst: "prod/api", port: "80/TCP", want: "ingress-denied"},
			{src: "dev/web", dst: "prod/legacy", port: "80/TCP", want: "rule"},
			{src: "prod/web", dst: "prod/legacy", port: "80/TCP", want: "rule"},
			{src: "prod/bare", dst: "prod/legacy", port: "80/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "podSelector alone: the policy's namespace only; namespaceSelector {} : every namespace, even one without an object",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: own, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: all, namespace: prod}
spec:
  podSelector: {matchLabels: {app: legacy}}
  ingress:
  - from: [{namespaceSelector: {}}]`,
		checks: []specCheck{
			{src: "prod/bare", dst: "prod/api", port: "80/TCP", want: "rule"},
			{src: "dev/web", dst: "prod/api", port: "80/TCP", want: "ingress-denied"},
			{src: "ghost/tool", dst: "prod/legacy", port: "80/TCP", want: "rule"},
			{src: "ext", dst: "prod/legacy", port: "80/TCP", want: "ingress-denied"}, // selectors never match outside addresses
			{src: "prod/hostnet", dst: "prod/legacy", port: "80/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "namespaces carry kubernetes.io/metadata.name, also when the file has no Namespace object",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ghost}}
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [dev]}]`,
		checks: []specCheck{
			{src: "ghost/tool", dst: "prod/web", port: "80/TCP", want: "rule"},
			{src: "dev/web", dst: "prod/web", port: "80/TCP", want: "rule"},
			{src: "prod/bare", dst: "prod/web", port: "80/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "ipBlock with except; it matches pod addresses too; both families",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.128/25]}
    - ipBlock: {cidr: 10.1.0.0/24}
    - ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8:0:1::/64"]}`,
		checks: []specCheck{
			{src: "prod/web", dst: "db", port: "5432/TCP", want: "rule"},
			{src: "prod/web", dst: "db-except", port: "5432/TCP", want: "egress-denied"},
			{src: "prod/web", dst: "prod/api", port: "80/TCP", want: "rule"},
			{src: "prod/web", dst: "dev/web", port: "80/TCP", want: "egress-denied"},
			{src: "prod/web6", dst: "ext6", port: "80/TCP", want: "rule"},
			{src: "prod/web6", dst: "ext6b", port: "80/TCP", want: "egress-denied"},
		},
	},
	{
		name: "named ports resolve against the destination pod with that protocol; unresolved matches nothing",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: out, namespace: dev}
spec:
  podSelector: {}
  egress:
  - ports: [{port: http}, {port: dns, protocol: UDP}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: in, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: http}, {port: dns}]`,
		checks: []specCheck{
			{src: "dev/web", dst: "prod/web", port: "8080/TCP", want: "rule"},           // web's http
			{src: "dev/web", dst: "prod/api", port: "9000/TCP", want: "rule"},           // api's http
			{src: "dev/web", dst: "prod/api", port: "8080/TCP", want: "egress-denied"},  // not api's http
			{src: "dev/web", dst: "ext", port: "8080/TCP", want: "egress-denied"},       // no pod, no ports
			{src: "dev/web", dst: "prod/web", port: "53/UDP", want: "ingress-denied"},   // egress ok; ingress "dns" is TCP
			{src: "prod/bare", dst: "prod/web", port: "53/TCP", want: "ingress-denied"}, // dns/TCP resolves nowhere
			{src: "prod/api", dst: "prod/web", port: "8080/TCP", want: "rule"},          // resolved at web, not at api
			{src: "prod/api", dst: "prod/web", port: "9000/TCP", want: "ingress-denied"},
		},
	},
	{
		name: "endPort is inclusive; a protocol-only entry admits all its ports",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - ports:
    - {port: 8000, endPort: 8005}
    - {protocol: SCTP}`,
		checks: []specCheck{
			{src: "ext", dst: "prod/api", port: "7999/TCP", want: "ingress-denied"},
			{src: "ext", dst: "prod/api", port: "8000/TCP", want: "rule"},
			{src: "ext", dst: "prod/api", port: "8005/TCP", want: "rule"},
			{src: "ext", dst: "prod/api", port: "8006/TCP", want: "ingress-denied"},
			{src: "ext", dst: "prod/api", port: "8003/UDP", want: "ingress-denied"},
			{src: "ext", dst: "prod/api", port: "1/SCTP", want: "rule"},
			{src: "ext", dst: "prod/api", port: "65535/SCTP", want: "rule"},
		},
	},
	{
		name: "hostNetwork and finished pods take no part; a podIP-only pod does; the first of two pods claiming an IP owns it",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {app: second}}}]`,
		checks: []specCheck{
			{src: "ext", dst: "prod/hostnet", port: "80/TCP", want: "unisolated"},
			{src: "ext", dst: "prod/done", port: "80/TCP", want: "unisolated"},
			{src: "ext", dst: "prod/legacy", port: "80/TCP", want: "ingress-denied"},
			{src: "prod/dup", dst: "prod/web", port: "80/TCP", want: "ingress-denied"}, // a-dup (app=first) owns it
		},
	},
	{
		name: "egress is judged at a local source, ingress at a local destination; egress denial is reported first",
		policies: `
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]`,
		checks: []specCheck{
			{src: "prod/web", dst: "prod/api", port: "80/TCP", node: "", want: "egress-denied"},
			{src: "prod/web", dst: "prod/api", port: "80/TCP", node: "n1", want: "egress-denied"},
			{src: "prod/web", dst: "prod/api", port: "80/TCP", node: "n2", want: "ingress-denied"},
			{src: "prod/web", dst: "prod/api", port: "80/TCP", node: "n3", want: "unisolated"},
			{src: "ext", dst: "dev/web", port: "80/TCP", node: "", want: "unisolated"},
		},
	},
}

func TestReferenceSpecPins(t *testing.T) {
	base := decodeStateYAML(t, "specCluster", []byte(specCluster))
	for _, c := range specCases {
		t.Run(c.name, func(t *testing.T) {
			pol := decodeStateYAML(t, c.name, []byte(c.policies))
			if len(pol.Policies) == 0 {
				t.Fatal("no policies decoded")
			}
			st := &policy.State{Namespaces: base.Namespaces, Pods: base.Pods, Policies: pol.Policies}
			for _, ch := range c.checks {
				f := specFlow(t, ch)
				opt := policy.Options{Node: ch.node}
				ref := policy.ReferenceDecide(st, opt, f)
				if ref.Reason.String() != ch.want {
					t.Errorf("%s -> %s %s node=%q: reference says %s, want %s", ch.src, ch.dst, ch.port, ch.node, ref.Reason, ch.want)
				}
				snap, err := policy.Compile(st, opt)
				if err != nil {
					t.Fatal(err)
				}
				if got := snap.Decide(f); got.Reason.String() != ch.want {
					t.Errorf("%s -> %s %s node=%q: Decide says %s, want %s", ch.src, ch.dst, ch.port, ch.node, got.Reason, ch.want)
				}
			}
		})
	}
}

func specFlow(t *testing.T, c specCheck) policy.Flow {
	t.Helper()
	addr := func(name string) netip.Addr {
		s, ok := specAddr[name]
		if !ok {
			t.Fatalf("no address named %q", name)
		}
		return netip.MustParseAddr(s)
	}
	f := policy.Flow{Src: addr(c.src), Dst: addr(c.dst)}
	if c.port == "ICMP" {
		f.Proto = 1
		return f
	}
	num, proto, _ := strings.Cut(c.port, "/")
	n, err := strconv.Atoi(num)
	if err != nil {
		t.Fatalf("port %q", c.port)
	}
	p, ok := policy.ProtocolFromK8s(corev1.Protocol(proto))
	if !ok {
		t.Fatalf("protocol %q", proto)
	}
	f.Proto, f.Port = p, uint16(n)
	return f
}

// decodeStateYAML decodes Namespaces, Pods and NetworkPolicies from multi-document YAML as
// written, without defaulting: Compile and the reference must default by themselves.
func decodeStateYAML(t testing.TB, name string, data []byte) *policy.State {
	t.Helper()
	st := &policy.State{}
	for i, doc := range splitYAMLDocs(data) {
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatalf("%s document %d: %v", name, i, err)
		}
		switch meta.Kind {
		case "":
			continue // comments only
		case "Namespace":
			var o corev1.Namespace
			mustStrict(t, name, i, doc, &o)
			st.Namespaces = append(st.Namespaces, o)
		case "Pod":
			var o corev1.Pod
			mustStrict(t, name, i, doc, &o)
			st.Pods = append(st.Pods, o)
		case "NetworkPolicy":
			var o networkingv1.NetworkPolicy
			mustStrict(t, name, i, doc, &o)
			st.Policies = append(st.Policies, o)
		default:
			t.Fatalf("%s document %d: unexpected kind %q", name, i, meta.Kind)
		}
	}
	return st
}
