package watch

import (
	"slices"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/sluice-dev/sluice/policy"
)

// cachedPod is the pod informer's cache entry: what policy reads of a pod and nothing else. A
// corev1.Pod struct alone is 1.2 kB even when empty; at tens of thousands of pods the difference
// is tens of megabytes on every node.
type cachedPod struct {
	metav1.TypeMeta
	metav1.ObjectMeta // name, namespace, uid, resourceVersion, deletionTimestamp, labels
	NodeName          string
	HostNetwork       bool
	Phase             corev1.PodPhase
	PodIP             string
	PodIPs            []corev1.PodIP
	Containers        []corev1.Container // only those with named ports, only Name and Ports
	InitContainers    []corev1.Container // restartable (sidecar) ones with named ports, likewise
}

func newCachedPod(o *corev1.Pod) *cachedPod {
	p := &cachedPod{
		// deletionTimestamp decides who owns an address two pods claim (policy.Compile).
		ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion,
			DeletionTimestamp: o.DeletionTimestamp},
		NodeName:    o.Spec.NodeName,
		HostNetwork: o.Spec.HostNetwork,
		Phase:       o.Status.Phase,
		PodIP:       o.Status.PodIP,
		PodIPs:      o.Status.PodIPs,
	}
	if !policy.Participates(o) {
		// Labels and ports matter only for pods that carry traffic; an update that makes the
		// pod take part arrives as a whole object and is converted again.
		return p
	}
	p.Labels = o.Labels
	for _, c := range o.Spec.Containers {
		if ports := namedPorts(c.Ports); len(ports) > 0 {
			p.Containers = append(p.Containers, corev1.Container{Name: c.Name, Ports: ports})
		}
	}
	for _, c := range o.Spec.InitContainers {
		// Sidecars serve ports like containers do; other init containers name nothing.
		if policy.IsSidecar(&c) {
			if ports := namedPorts(c.Ports); len(ports) > 0 {
				p.InitContainers = append(p.InitContainers, corev1.Container{Name: c.Name, Ports: ports, RestartPolicy: c.RestartPolicy})
			}
		}
	}
	return p
}

// pod rebuilds the corev1.Pod that policy.Compile reads. It shares the labels and containers
// with the cache entry; both are only read.
func (p *cachedPod) pod() corev1.Pod {
	return corev1.Pod{
		ObjectMeta: p.ObjectMeta,
		Spec:       corev1.PodSpec{NodeName: p.NodeName, HostNetwork: p.HostNetwork, Containers: p.Containers, InitContainers: p.InitContainers},
		Status:     corev1.PodStatus{Phase: p.Phase, PodIP: p.PodIP, PodIPs: p.PodIPs},
	}
}

// DeepCopyObject makes cachedPod a runtime.Object, as the informer's store requires.
func (p *cachedPod) DeepCopyObject() runtime.Object {
	c := *p
	p.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.PodIPs = slices.Clone(p.PodIPs)
	c.Containers = copyContainers(p.Containers)
	c.InitContainers = copyContainers(p.InitContainers)
	return &c
}

func copyContainers(in []corev1.Container) []corev1.Container {
	if in == nil {
		return nil
	}
	out := make([]corev1.Container, len(in))
	for i := range in {
		in[i].DeepCopyInto(&out[i])
	}
	return out
}

// samePolicyView reports whether two cache entries are the same to policy.
func (p *cachedPod) samePolicyView(o *cachedPod) bool {
	return p.NodeName == o.NodeName && p.HostNetwork == o.HostNetwork && p.Phase == o.Phase && p.PodIP == o.PodIP &&
		(p.DeletionTimestamp == nil) == (o.DeletionTimestamp == nil) &&
		apiequality.Semantic.DeepEqual(p.Labels, o.Labels) && apiequality.Semantic.DeepEqual(p.PodIPs, o.PodIPs) &&
		apiequality.Semantic.DeepEqual(p.Containers, o.Containers) && apiequality.Semantic.DeepEqual(p.InitContainers, o.InitContainers)
}
