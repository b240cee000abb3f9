package watch

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-dev/sluice/policy"
)

// A policy that does not compile must not open traffic: the pods it selects stay isolated
// without its rules, while valid policies keep working.
func TestNeutraliseKeepsIsolation(t *testing.T) {
	ip := func(s string) corev1.PodStatus {
		return corev1.PodStatus{Phase: corev1.PodRunning, PodIP: s, PodIPs: []corev1.PodIP{{IP: s}}}
	}
	st := &policy.State{
		Namespaces: []corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "a"}}},
		Pods: []corev1.Pod{
			{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "db", Labels: map[string]string{"tier": "db"}}, Status: ip("10.0.0.2")},
			{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web", Labels: map[string]string{"tier": "web"}}, Status: ip("10.0.0.3")},
			{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "cache", Labels: map[string]string{"tier": "cache"}}, Status: ip("10.0.0.4")},
		},
		Policies: []networkingv1.NetworkPolicy{
			{ // broken peer CIDR: the db must stay isolated
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "db", ResourceVersion: "7"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "db"}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
						{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0"}},
						{IPBlock: &networkingv1.IPBlock{CIDR: "not-a-cidr"}},
					}}},
				},
			},
			{ // broken pod selector: every pod of the namespace is isolated
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "weird", ResourceVersion: "8"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "tier", Operator: "Bogus"}}},
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{}},
				},
			},
			{ // valid: web is reachable on 80 from anywhere
				ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}},
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(80))}}}},
				},
			},
		},
	}
	if _, err := policy.Compile(st, policy.Options{}); err == nil {
		t.Fatal("the broken state compiled; the test needs policies that do not")
	}
	s := NewAPISource(nil, policy.Options{}, testLogger(t), 0)
	pub := newPublisher("test", s.opt, testLogger(t))
	objs := newFileObjects(s.opt)
	objs.update(st)
	snap, err := pub.build(objs.b)
	snap, err = s.accept(snap, err, func(key string) string {
		for i := range st.Policies {
			if st.Policies[i].Namespace+"/"+st.Policies[i].Name == key {
				return st.Policies[i].ResourceVersion
			}
		}
		return ""
	})
	if err != nil {
		t.Fatalf("compile with neutralisation: %v", err)
	}
	for _, tc := range []struct {
		src, dst string
		port     uint16
		want     bool
	}{
		{"192.0.2.1", "10.0.0.2", 5432, false}, // db: the broken policy would have allowed 0.0.0.0/0
		{"10.0.0.3", "10.0.0.2", 5432, false},
		{"192.0.2.1", "10.0.0.4", 6379, false}, // cache: isolated by the broken selector's fallback
		{"192.0.2.1", "10.0.0.3", 80, true},    // web: the valid policy still allows
		{"192.0.2.1", "10.0.0.3", 81, false},
	} {
		if v := snap.Decide(tcp(tc.src, tc.dst, tc.port)); v.Allowed != tc.want {
			t.Errorf("%s -> %s:%d = %v, want allowed=%v", tc.src, tc.dst, tc.port, v, tc.want)
		}
	}
	if len(s.badSeen) != 2 {
		t.Errorf("reported bad policies %v, want a/db and a/weird", s.badSeen)
	}
}

func TestTrimKeepsWhatPolicyReads(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	in := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p", Labels: map[string]string{"x": "y"}, ResourceVersion: "3",
			Annotations:   map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
		Spec: corev1.PodSpec{NodeName: "n1",
			Containers: []corev1.Container{{Name: "c", Image: "i", Env: []corev1.EnvVar{{Name: "A", Value: "B"}},
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}, {ContainerPort: 9090}}}},
			InitContainers: []corev1.Container{{Name: "side", RestartPolicy: &always, Ports: []corev1.ContainerPort{{Name: "m", ContainerPort: 9100}}},
				{Name: "init", Ports: []corev1.ContainerPort{{Name: "z", ContainerPort: 1}}}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady}}},
	}
	o, _ := trim(in)
	cp := o.(*cachedPod)
	if cp.GetName() != "p" || cp.GetNamespace() != "a" || cp.GetResourceVersion() != "3" {
		t.Errorf("the cache entry lost its identity: %+v", cp.pod().ObjectMeta)
	}
	cpCopy := cp.DeepCopyObject().(*cachedPod)
	if !cpCopy.samePolicyView(cp) {
		t.Error("DeepCopyObject changed the entry")
	}
	cpCopy.labels.m["x"] = "changed"
	if cp.labels.m["x"] != "y" {
		t.Error("DeepCopyObject shares the labels")
	}
	pod := cp.pod()
	p := &pod
	if p.Annotations != nil || p.ManagedFields != nil || p.Status.Conditions != nil || p.Spec.Containers[0].Env != nil || p.Spec.Containers[0].Image != "" {
		t.Errorf("trim kept what policy does not read: %+v", p)
	}
	if p.Labels["x"] != "y" || p.Spec.NodeName != "n1" || p.Status.PodIP != "10.0.0.1" || len(p.Status.PodIPs) != 1 ||
		len(p.Spec.Containers) != 1 || len(p.Spec.Containers[0].Ports) != 1 || p.Spec.Containers[0].Ports[0].Name != "http" ||
		len(p.Spec.InitContainers) != 1 || p.Spec.InitContainers[0].Name != "side" {
		t.Errorf("trim lost what policy reads: %+v", p)
	}
	again, _ := trim(cp)
	if relevantChange(cp, again) {
		t.Error("trim is not idempotent")
	}
	moved := in.DeepCopy()
	moved.Status.Conditions = append(moved.Status.Conditions, corev1.PodCondition{Type: corev1.ContainersReady})
	moved.ResourceVersion = "4"
	m2, _ := trim(moved)
	if relevantChange(cp, m2) {
		t.Error("a condition-only update counted as a change")
	}
	moved.Labels = map[string]string{"x": "z"}
	m3, _ := trim(moved)
	if !relevantChange(cp, m3) {
		t.Error("a label change not counted")
	}
	// A pod being deleted loses an address it shares with another pod (policy.Compile), so
	// deletionTimestamp is kept and its arrival is a change.
	deleting := in.DeepCopy()
	deleting.DeletionTimestamp = &metav1.Time{Time: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	m4, _ := trim(deleting)
	if got := m4.(*cachedPod).pod(); got.DeletionTimestamp == nil || !got.DeletionTimestamp.Equal(deleting.DeletionTimestamp) {
		t.Errorf("trim lost deletionTimestamp: %v", got.DeletionTimestamp)
	}
	if !relevantChange(cp, m4) {
		t.Error("a pod turning terminating not counted as a change")
	}
}

// A sidecar's named port, cached by trim, is one a policy can name; an ordinary init
// container's is dropped and matches nothing.
func TestCachedPodSidecarPortsMatch(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	in := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p", Labels: map[string]string{"app": "x"}},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP}}}},
			InitContainers: []corev1.Container{
				{Name: "proxy", RestartPolicy: &always, Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9090, Protocol: corev1.ProtocolTCP}}},
				{Name: "setup", Ports: []corev1.ContainerPort{{Name: "setup", ContainerPort: 7000, Protocol: corev1.ProtocolTCP}}},
			},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}}},
	}
	o, _ := trim(in)
	var ports []networkingv1.NetworkPolicyPort
	for _, n := range []string{"http", "metrics", "setup"} {
		ports = append(ports, networkingv1.NetworkPolicyPort{Port: ptr(intstr.FromString(n))})
	}
	st := &policy.State{
		Pods: []corev1.Pod{o.(*cachedPod).pod()},
		Policies: []networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "named"},
			Spec:       networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports}}},
		}},
	}
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for port, want := range map[uint16]bool{80: true, 9090: true, 7000: false} {
		if v := snap.Decide(tcp("192.0.2.1", "10.0.0.1", port)); v.Allowed != want {
			t.Errorf("port %d through the cached pod: %+v, want allowed=%v", port, v, want)
		}
	}
}

func TestNextBuildWait(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	const debounce = 100 * time.Millisecond
	const patch, compile = 400 * time.Microsecond, time.Second
	for _, tc := range []struct {
		name      string
		now, last time.Time
		took      time.Duration
		want      time.Duration
	}{
		{"first build", t0, time.Time{}, 0, 0},
		{"idle for longer than the window: at once", t0.Add(time.Second), t0, compile, 0},
		{"after a patch: the least window", t0, t0, patch, minBuildWindow},
		{"within the window of a patch: the rest of it", t0.Add(4 * time.Millisecond), t0, patch, 6 * time.Millisecond},
		{"just after the window of a patch", t0.Add(minBuildWindow), t0, patch, 0},
		{"after a 3 ms build: 20 times that", t0, t0, 3 * time.Millisecond, 60 * time.Millisecond},
		{"after a full compile: at most the debounce", t0.Add(30 * time.Millisecond), t0, compile, 70 * time.Millisecond},
	} {
		if got := nextBuildWait(tc.now, tc.last, tc.took, debounce); got != tc.want {
			t.Errorf("%s: nextBuildWait = %v, want %v", tc.name, got, tc.want)
		}
	}
}
