package main

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/policy"
	"github.com/sluice-dev/sluice/watch/kubetest"
)

// sluice claims to validate state files as the API server would. This asks a real
// kube-apiserver (dry-run) about the same objects and requires the same yes/no for each.
func TestValidationAgreesWithAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kube-apiserver and etcd")
	}
	env := kubetest.Start(t)
	ctx := context.Background()
	if _, err := env.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "prod"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}

	policySpecs := []string{
		// valid
		"podSelector: {}",
		"podSelector: {matchLabels: {app: web, example.com/tier: front-end}, matchExpressions: [{key: env, operator: In, values: [a, b]}, {key: c, operator: DoesNotExist}, {key: z, operator: NotIn, values: [\"\"]}]}",
		"podSelector: {}\ningress: [{}, {from: [], ports: []}]",
		"podSelector: {}\ningress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}, {ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}, {ipBlock: {cidr: \"::/0\", except: [\"fd00::/8\"]}}]}]",
		"podSelector: {}\negress: [{ports: [{port: 80}, {port: http, protocol: TCP}, {port: 32000, endPort: 32768, protocol: UDP}, {port: 5000, endPort: 5000}, {protocol: SCTP}, {port: 65535}]}]",
		"podSelector: {}\npolicyTypes: [Egress]",
		// invalid
		"podSelector: {matchExpressions: [{key: app, operator: In}]}",
		"podSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}",
		"podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}",
		"podSelector: {matchLabels: {\"-app\": web}}",
		"podSelector: {matchLabels: {app: \"web server\"}}",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0/8}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.1/8}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 010.0.0.0/8}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: \"::ffff:10.0.0.0/104\"}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [\"fd00::/64\"]}}]}]",
		"podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
		"podSelector: {}\ningress: [{from: [{}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 0}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 65536}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 8080, endPort: 80}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 8080, endPort: 70000}]}]",
		"podSelector: {}\ningress: [{ports: [{port: http, endPort: 90}]}]",
		"podSelector: {}\ningress: [{ports: [{endPort: 90}]}]",
		"podSelector: {}\ningress: [{ports: [{port: web_http}]}]",
		"podSelector: {}\ningress: [{ports: [{port: \"80\"}]}]",
		"podSelector: {}\ningress: [{ports: [{port: abcdefghijklmnop}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 80, protocol: ICMP}]}]",
		"podSelector: {}\ningress: [{ports: [{port: 80, protocol: tcp}]}]",
		"podSelector: {}\npolicyTypes: [Ingress, egress]",
		"podSelector: {}\npolicyTypes: [Ingress, Egress, Ingress]",
	}
	const firstInvalidPolicy = 6
	for i, spec := range policySpecs {
		doc := "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n  " + strings.ReplaceAll(spec, "\n", "\n  ") + "\n"
		var np networkingv1.NetworkPolicy
		if err := yaml.Unmarshal([]byte(doc), &np); err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		_, _, ours := policy.Load(strings.NewReader(doc), "np.yaml")
		_, theirs := env.Client.NetworkingV1().NetworkPolicies("prod").Create(ctx, &np, dryRun)
		if valid := i < firstInvalidPolicy; (ours == nil) != valid || (theirs == nil) != valid {
			t.Errorf("policy spec %q (valid: %v):\n  sluice:         %v\n  kube-apiserver: %v", spec, valid, ours, theirs)
		}
	}

	// Defaulting: what the API server stores equals what Load makes of the same file.
	for _, spec := range []string{
		"podSelector: {}",
		"podSelector: {}\ningress: [{ports: [{port: 80}, {port: http}]}]",
		"podSelector: {}\negress: [{ports: [{port: 53, protocol: UDP}, {port: 443}]}]",
		"podSelector: {}\negress: []",
		"podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]",
	} {
		doc := "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: prod}\nspec:\n  " + strings.ReplaceAll(spec, "\n", "\n  ") + "\n"
		var np networkingv1.NetworkPolicy
		if err := yaml.Unmarshal([]byte(doc), &np); err != nil {
			t.Fatal(err)
		}
		stored, err := env.Client.NetworkingV1().NetworkPolicies("prod").Create(ctx, &np, dryRun)
		if err != nil {
			t.Fatalf("%q: %v", spec, err)
		}
		st, _, err := policy.Load(strings.NewReader(doc), "np.yaml")
		if err != nil {
			t.Fatal(err)
		}
		if !equality.Semantic.DeepEqual(st.Policies[0].Spec, stored.Spec) {
			t.Errorf("defaulting of %q:\n  sluice:         %+v\n  kube-apiserver: %+v", spec, st.Policies[0].Spec, stored.Spec)
		}
	}
	ns, err := env.Client.CoreV1().Namespaces().Get(ctx, "prod", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, _, err := policy.Load(strings.NewReader("apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n"), "ns.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !equality.Semantic.DeepEqual(st.Namespaces[0].Labels, ns.Labels) {
		t.Errorf("namespace labels: sluice %v, kube-apiserver %v", st.Namespaces[0].Labels, ns.Labels)
	}

	// Pod IPs are status: create the pod, then ask about each status update.
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "prod", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "web", Image: "nginx",
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
	}
	created, err := env.Client.CoreV1().Pods("prod").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pst, _, err := policy.Load(strings.NewReader("apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod}\nspec: {containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080}]}]}\n"), "pod.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := pst.Pods[0].Spec.Containers[0].Ports, created.Spec.Containers[0].Ports; !equality.Semantic.DeepEqual(got, want) {
		t.Errorf("container port defaulting: sluice %+v, kube-apiserver %+v", got, want)
	}
	const firstInvalidIPs = 3
	for i, ips := range [][]string{
		{"10.244.0.5"},
		{"10.244.0.5", "fd00::5"},
		{"fd00::5", "10.244.0.5"},
		{"10.0.0.256"},
		{"10.0.0.01"},
		{"::ffff:10.0.0.1"},
		{"10.0.0.1", "10.0.0.2"},
		{"fd00::1", "fd00::2"},
	} {
		st := created.DeepCopy()
		st.Status.PodIP = ips[0]
		st.Status.PodIPs = nil
		for _, ip := range ips {
			st.Status.PodIPs = append(st.Status.PodIPs, corev1.PodIP{IP: ip})
		}
		_, theirs := env.Client.CoreV1().Pods("prod").UpdateStatus(ctx, st, metav1.UpdateOptions{DryRun: []string{metav1.DryRunAll}})
		out, err := yaml.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		_, _, ours := policy.Load(strings.NewReader("apiVersion: v1\nkind: Pod\n"+string(out)), "pod.yaml")
		if valid := i < firstInvalidIPs; (ours == nil) != valid || (theirs == nil) != valid {
			t.Errorf("pod IPs %v (valid: %v):\n  sluice:         %v\n  kube-apiserver: %v", ips, valid, ours, theirs)
		}
	}
}
