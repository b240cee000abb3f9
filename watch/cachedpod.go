package watch

import (
	"maps"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-dev/sluice/policy"
)

// cachedPod is the pod informer's cache entry: what policy reads of a pod and nothing else. A
// corev1.Pod struct alone is 1.2 kB even when empty, and an ObjectMeta 232 bytes; at tens of
// thousands of pods the difference is tens of megabytes on every node.
type cachedPod struct {
	droppedMeta
	name, namespace string
	// resourceVersion tells the informer a real update from a resync: an update with the same
	// version reaches no handler that asked for no resync, ours included.
	resourceVersion string
	// deletionTimestamp decides who owns an address two pods claim (policy.Compile).
	deletionTimestamp *metav1.Time
	labels            map[string]string
	nodeName          string
	phase             corev1.PodPhase
	podIP             string
	podIPs            []corev1.PodIP
	containers        []corev1.Container // only those with named ports, only Name and Ports
	initContainers    []corev1.Container // restartable (sidecar) ones with named ports, likewise
	hostNetwork       bool
}

func newCachedPod(o *corev1.Pod) *cachedPod {
	p := &cachedPod{
		name: o.Name, namespace: o.Namespace, resourceVersion: o.ResourceVersion,
		deletionTimestamp: o.DeletionTimestamp,
		nodeName:          o.Spec.NodeName,
		hostNetwork:       o.Spec.HostNetwork,
		phase:             o.Status.Phase,
		podIP:             o.Status.PodIP,
		podIPs:            o.Status.PodIPs,
	}
	if !policy.Participates(o) {
		// Labels and ports matter only for pods that carry traffic; an update that makes the
		// pod take part arrives as a whole object and is converted again.
		return p
	}
	p.labels = o.Labels
	for _, c := range o.Spec.Containers {
		if ports := namedPorts(c.Ports); len(ports) > 0 {
			p.containers = append(p.containers, corev1.Container{Name: c.Name, Ports: ports})
		}
	}
	for _, c := range o.Spec.InitContainers {
		// Sidecars serve ports like containers do; other init containers name nothing.
		if policy.IsSidecar(&c) {
			if ports := namedPorts(c.Ports); len(ports) > 0 {
				p.initContainers = append(p.initContainers, corev1.Container{Name: c.Name, Ports: ports, RestartPolicy: c.RestartPolicy})
			}
		}
	}
	return p
}

// pod rebuilds the corev1.Pod that policy.Compile reads. It shares the labels and containers
// with the cache entry; both are only read.
func (p *cachedPod) pod() corev1.Pod {
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.namespace, ResourceVersion: p.resourceVersion,
			DeletionTimestamp: p.deletionTimestamp, Labels: p.labels},
		Spec:   corev1.PodSpec{NodeName: p.nodeName, HostNetwork: p.hostNetwork, Containers: p.containers, InitContainers: p.initContainers},
		Status: corev1.PodStatus{Phase: p.phase, PodIP: p.podIP, PodIPs: p.podIPs},
	}
}

// DeepCopyObject makes cachedPod a runtime.Object, as the informer's store requires.
func (p *cachedPod) DeepCopyObject() runtime.Object {
	c := *p
	c.deletionTimestamp = p.deletionTimestamp.DeepCopy()
	c.labels = maps.Clone(p.labels)
	c.podIPs = slices.Clone(p.podIPs)
	c.containers = copyContainers(p.containers)
	c.initContainers = copyContainers(p.initContainers)
	return &c
}

// GetObjectKind is the entry's type, which nothing reads: the reflector checks the kind of
// what it decodes, before trim.
func (p *cachedPod) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// The metadata the informer reads (keys, the version), and what policy reads. Implementing
// metav1.Object here, rather than answering GetObjectMeta with an ObjectMeta built per call,
// spares an allocation every time the informer takes an entry's key.
func (p *cachedPod) GetName() string                             { return p.name }
func (p *cachedPod) SetName(name string)                         { p.name = name }
func (p *cachedPod) GetNamespace() string                        { return p.namespace }
func (p *cachedPod) SetNamespace(namespace string)               { p.namespace = namespace }
func (p *cachedPod) GetResourceVersion() string                  { return p.resourceVersion }
func (p *cachedPod) SetResourceVersion(version string)           { p.resourceVersion = version }
func (p *cachedPod) GetDeletionTimestamp() *metav1.Time          { return p.deletionTimestamp }
func (p *cachedPod) SetDeletionTimestamp(timestamp *metav1.Time) { p.deletionTimestamp = timestamp }
func (p *cachedPod) GetLabels() map[string]string                { return p.labels }
func (p *cachedPod) SetLabels(labels map[string]string)          { p.labels = labels }

// droppedMeta answers for the metadata trim drops: nothing, and setting it does nothing, as
// metav1.Common documents for a field an object does not have. It has no size, and comes first
// in cachedPod, where it adds no padding either.
type droppedMeta struct{}

func (droppedMeta) GetGenerateName() string                       { return "" }
func (droppedMeta) SetGenerateName(string)                        {}
func (droppedMeta) GetUID() types.UID                             { return "" }
func (droppedMeta) SetUID(types.UID)                              {}
func (droppedMeta) GetGeneration() int64                          { return 0 }
func (droppedMeta) SetGeneration(int64)                           {}
func (droppedMeta) GetSelfLink() string                           { return "" }
func (droppedMeta) SetSelfLink(string)                            {}
func (droppedMeta) GetCreationTimestamp() metav1.Time             { return metav1.Time{} }
func (droppedMeta) SetCreationTimestamp(metav1.Time)              {}
func (droppedMeta) GetDeletionGracePeriodSeconds() *int64         { return nil }
func (droppedMeta) SetDeletionGracePeriodSeconds(*int64)          {}
func (droppedMeta) GetAnnotations() map[string]string             { return nil }
func (droppedMeta) SetAnnotations(map[string]string)              {}
func (droppedMeta) GetFinalizers() []string                       { return nil }
func (droppedMeta) SetFinalizers([]string)                        {}
func (droppedMeta) GetOwnerReferences() []metav1.OwnerReference   { return nil }
func (droppedMeta) SetOwnerReferences([]metav1.OwnerReference)    {}
func (droppedMeta) GetManagedFields() []metav1.ManagedFieldsEntry { return nil }
func (droppedMeta) SetManagedFields([]metav1.ManagedFieldsEntry)  {}

var _ metav1.Object = (*cachedPod)(nil)

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
	return p.nodeName == o.nodeName && p.hostNetwork == o.hostNetwork && p.phase == o.phase && p.podIP == o.podIP &&
		(p.deletionTimestamp == nil) == (o.deletionTimestamp == nil) &&
		apiequality.Semantic.DeepEqual(p.labels, o.labels) && apiequality.Semantic.DeepEqual(p.podIPs, o.podIPs) &&
		apiequality.Semantic.DeepEqual(p.containers, o.containers) && apiequality.Semantic.DeepEqual(p.initContainers, o.initContainers)
}
