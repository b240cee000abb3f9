package watch

import (
	"maps"
	"runtime"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestSharedValues(t *testing.T) {
	s := newSharedValues(func(a, b *podLabels) bool { return maps.Equal(a.m, b.m) })
	a := s.share(1, &podLabels{map[string]string{"app": "x"}})
	if b := s.share(1, &podLabels{map[string]string{"app": "x"}}); b != a {
		t.Error("an equal value is not shared")
	}
	other := &podLabels{map[string]string{"app": "y"}}
	if got := s.share(1, other); got != other {
		t.Error("a different value with the same hash is not returned as it is")
	}
	if got := s.share(2, &podLabels{map[string]string{"app": "x"}}); got == a {
		t.Error("a value of another hash is taken for an equal one")
	}
	runtime.KeepAlive(a)

	// Once nothing holds them, the table forgets its values (their cleanups run after a
	// collection, on another goroutine).
	held := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.byHash)
	}
	for deadline := time.Now().Add(10 * time.Second); held() > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the table still lists %d values nothing holds", held())
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	fresh := &podLabels{map[string]string{"app": "x"}}
	if got := s.share(1, fresh); got != fresh {
		t.Error("a value equal to a freed one is not held anew")
	}
}

// Pods with the same labels and named ports share them; a pod with others has its own.
func TestTrimSharesLabelsAndPorts(t *testing.T) {
	pod := func(name, app string, port int32) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: name, Labels: map[string]string{"app": app, "tier": "web"}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: port}}}}},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}}},
		}
	}
	entry := func(p *corev1.Pod) *cachedPod { o, _ := trim(p); return o.(*cachedPod) }
	a, b := entry(pod("a", "x", 80)), entry(pod("b", "x", 80))
	if a.labels != b.labels || a.ports != b.ports {
		t.Error("two replicas do not share their labels and ports")
	}
	c := entry(pod("c", "y", 81))
	if c.labels == a.labels || c.ports == a.ports {
		t.Error("a pod with other labels and ports shares a replica's")
	}
	if got := c.pod(); got.Labels["app"] != "y" || got.Spec.Containers[0].Ports[0].ContainerPort != 81 {
		t.Errorf("the pod with its own labels and ports reads %v and %v", got.Labels, got.Spec.Containers[0].Ports)
	}
	if !a.samePolicyView(b) || a.samePolicyView(c) {
		t.Error("samePolicyView does not follow the shared labels and ports")
	}
}
