// Package deploy holds the manifests that install sluice on a cluster; its test creates them on
// a real kube-apiserver so they are known to be valid objects.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/policy"
	"github.com/sluice-dev/sluice/watch"
	"github.com/sluice-dev/sluice/watch/kubetest"
)

type kustomization struct {
	Namespace string   `json:"namespace"`
	Resources []string `json:"resources"`
}

// decodeFile reads every document of a manifest file strictly: a misspelt field is an error
// here, where kubectl would only warn.
func decodeFile(t *testing.T, path string) []runtime.Object {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var out []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		// Strict second pass into the typed object to catch unknown fields.
		typed, err := scheme.Scheme.New(*gvk)
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.UnmarshalStrict(js, typed); err != nil {
			t.Fatalf("%s: document %d (%s): %v", path, i, gvk.Kind, err)
		}
		out = append(out, obj)
	}
	return out
}

func stripComments(b []byte) []byte {
	var keep [][]byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			keep = append(keep, l)
		}
	}
	return bytes.Join(keep, []byte("\n"))
}

func loadKustomization(t *testing.T) (kustomization, []runtime.Object) {
	t.Helper()
	raw, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.Unmarshal(raw, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not listed in kustomization.yaml resources", f)
		}
	}
	var objs []runtime.Object
	for _, f := range k.Resources {
		objs = append(objs, decodeFile(t, f)...)
	}
	return k, objs
}

func TestManifestsShape(t *testing.T) {
	k, objs := loadKustomization(t)
	var ds *appsv1.DaemonSet
	var role *rbacv1.ClusterRole
	for _, o := range objs {
		switch o := o.(type) {
		case *appsv1.DaemonSet:
			ds = o
		case *rbacv1.ClusterRole:
			role = o
		}
		if m, ok := o.(metav1.Object); ok && m.GetNamespace() != "" && m.GetNamespace() != k.Namespace {
			t.Errorf("%T %s is in namespace %s, kustomization says %s", o, m.GetName(), m.GetNamespace(), k.Namespace)
		}
	}
	if ds == nil || role == nil {
		t.Fatal("no DaemonSet or ClusterRole in the manifests")
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	sc := c.SecurityContext
	check := func(ok bool, what string) {
		if !ok {
			t.Errorf("daemonset: %s", what)
		}
	}
	check(spec.HostNetwork, "hostNetwork must be true")
	check(spec.PriorityClassName == "system-node-critical", "priorityClassName system-node-critical")
	check(len(spec.Tolerations) == 1 && spec.Tolerations[0].Operator == corev1.TolerationOpExists && spec.Tolerations[0].Key == "", "one toleration, operator Exists, no key")
	check(sc != nil && sc.Privileged != nil && !*sc.Privileged, "privileged: false")
	check(sc != nil && sc.Capabilities != nil && slices.Contains(sc.Capabilities.Add, "NET_ADMIN"), "NET_ADMIN added")
	if sc != nil && sc.Capabilities != nil {
		for _, cp := range sc.Capabilities.Add {
			check(cp == "NET_ADMIN" || cp == "NET_RAW", "capability "+string(cp)+" is not needed")
		}
	}
	nodeName := false
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	check(nodeName, "NODE_NAME from the downward API spec.nodeName")
	check(c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path == "/healthz", "liveness probe on /healthz")
	check(c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil && c.ReadinessProbe.HTTPGet.Path == "/readyz", "readiness probe on /readyz")
	check(c.Resources.Requests.Cpu().MilliValue() > 0 && !c.Resources.Limits.Memory().IsZero(), "resource requests and limits")
	for _, r := range role.Rules {
		for _, v := range r.Verbs {
			check(v == "get" || v == "list" || v == "watch", "ClusterRole verb "+v+" (only get/list/watch)")
		}
		for _, res := range r.Resources {
			check(slices.Contains([]string{"pods", "namespaces", "networkpolicies"}, res), "ClusterRole resource "+res)
		}
	}
}

// TestManifestsOnRealAPIServer creates the manifests on a real kube-apiserver (server-side
// dry-run first, then for real), checks what the ServiceAccount may do, and runs the watch
// source with the ServiceAccount's identity, which proves the ClusterRole is enough.
func TestManifestsOnRealAPIServer(t *testing.T) {
	_, objs := loadKustomization(t)
	env := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := env.Client

	for _, dry := range []bool{true, false} {
		opts := metav1.CreateOptions{FieldValidation: "Strict"}
		if dry {
			opts.DryRun = []string{metav1.DryRunAll}
		}
		for _, o := range objs {
			if err := create(ctx, c, o, opts); err != nil {
				t.Fatalf("create %T (dry-run %v): %v", o, dry, err)
			}
		}
	}
	ds, err := c.AppsV1().DaemonSets("kube-system").Get(ctx, "sluice", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("created on the API server: %d objects; daemonset generation %d", len(objs), ds.Generation)

	sa := "system:serviceaccount:kube-system:sluice"
	for _, tc := range []struct {
		group, resource, verb string
		want                  bool
	}{
		{"", "pods", "list", true}, {"", "pods", "watch", true}, {"", "pods", "get", true},
		{"", "namespaces", "list", true}, {"", "namespaces", "watch", true},
		{"networking.k8s.io", "networkpolicies", "list", true}, {"networking.k8s.io", "networkpolicies", "watch", true},
		{"", "pods", "create", false}, {"", "pods", "delete", false}, {"", "secrets", "get", false},
		{"", "configmaps", "list", false}, {"networking.k8s.io", "networkpolicies", "update", false},
	} {
		sar, err := c.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: sa, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-system"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Group: tc.group, Resource: tc.resource, Verb: tc.verb}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != tc.want {
			t.Errorf("serviceaccount %s %s.%s: allowed=%v, want %v (%s)", tc.verb, tc.resource, tc.group, sar.Status.Allowed, tc.want, sar.Status.Reason)
		}
	}

	// The agent's watches, as the ServiceAccount.
	cfg := rest.CopyConfig(env.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: sa, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"}}
	src := watch.NewAPISource(cfg, policy.Options{Node: "node-1"}, nil, 0)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx, func(*policy.Snapshot) {}) }()
	deadline := time.Now().Add(30 * time.Second)
	for !src.Ready() {
		if time.Now().After(deadline) {
			stale, _ := src.Stale()
			t.Fatalf("the watch source running as %s was not ready within 30 s (stale=%v): the ClusterRole does not allow its list/watch", sa, stale)
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	if err := <-done; err != nil {
		t.Error(err)
	}
}

// TestExamplesOnRealAPIServer checks that the seed's example objects in deploy/examples are
// accepted by a real API server (server-side dry-run; the namespaces are created for real so
// the namespaced objects have somewhere to go).
func TestExamplesOnRealAPIServer(t *testing.T) {
	files, _ := filepath.Glob("examples/*.yaml")
	if len(files) == 0 {
		t.Skip("no deploy/examples yet")
	}
	env := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var others []runtime.Object
	n := 0
	for _, f := range files {
		for _, o := range decodeFile(t, f) {
			n++
			if ns, ok := o.(*corev1.Namespace); ok {
				if _, err := env.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{FieldValidation: "Strict"}); err != nil && !apierrors.IsAlreadyExists(err) {
					t.Errorf("%s: namespace %s: %v", f, ns.Name, err)
				}
				continue
			}
			others = append(others, o)
		}
	}
	for _, o := range others {
		if err := create(ctx, env.Client, o, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}); err != nil && !apierrors.IsAlreadyExists(err) {
			m, _ := o.(metav1.Object)
			t.Errorf("%T %s/%s: %v", o, m.GetNamespace(), m.GetName(), err)
		}
	}
	t.Logf("%d example objects from %d files accepted", n, len(files))
}

func create(ctx context.Context, c kubernetes.Interface, o runtime.Object, opts metav1.CreateOptions) error {
	var err error
	switch o := o.(type) {
	case *corev1.ServiceAccount:
		_, err = c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, opts)
	case *corev1.Namespace:
		_, err = c.CoreV1().Namespaces().Create(ctx, o, opts)
	case *corev1.Pod:
		_, err = c.CoreV1().Pods(o.Namespace).Create(ctx, o, opts)
	case *rbacv1.ClusterRole:
		_, err = c.RbacV1().ClusterRoles().Create(ctx, o, opts)
	case *rbacv1.ClusterRoleBinding:
		_, err = c.RbacV1().ClusterRoleBindings().Create(ctx, o, opts)
	case *appsv1.DaemonSet:
		_, err = c.AppsV1().DaemonSets(o.Namespace).Create(ctx, o, opts)
	case *networkingv1.NetworkPolicy:
		_, err = c.NetworkingV1().NetworkPolicies(o.Namespace).Create(ctx, o, opts)
	default:
		return errors.New("the test does not know how to create " + strings.TrimPrefix(reflectName(o), "*"))
	}
	return err
}

func reflectName(o runtime.Object) string {
	gvks, _, err := scheme.Scheme.ObjectKinds(o)
	if err != nil || len(gvks) == 0 {
		return "an unknown kind"
	}
	return gvks[0].Kind
}
