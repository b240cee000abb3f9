package watch

import (
	"hash/maphash"
	"maps"
	"slices"
	"unique"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-dev/sluice/policy"
)

// cachedPod is the pod informer's cache entry: what policy reads of a pod and nothing else. A
// corev1.Pod struct alone is 1.2 kB even when empty, and an ObjectMeta 232 bytes; at tens of
// thousands of pods the difference is tens of megabytes on every node. Labels and named ports
// are shared with the other pods that have the same (the replicas of a workload), and never
// changed; so are namespaces, node names and phases, a handful of each for thousands of pods.
type cachedPod struct {
	droppedMeta
	name      string
	namespace unique.Handle[string]
	// resourceVersion tells the informer a real update from a resync: an update with the same
	// version reaches no handler that asked for no resync, ours included.
	resourceVersion string
	// deletionTimestamp decides who owns an address two pods claim (policy.Compile).
	deletionTimestamp *metav1.Time
	labels            *podLabels // nil when none, or when the pod does not participate
	ports             *podPorts  // likewise
	nodeName          unique.Handle[string]
	phase             unique.Handle[corev1.PodPhase]
	podIP             string // the same bytes as podIPs[0].IP when they are equal, as they should be
	podIPs            []corev1.PodIP
	hostNetwork       bool
}

// podLabels is a pod's labels as the cache holds them.
type podLabels struct{ m map[string]string }

// podPorts is a pod's named ports as the cache holds them: the containers with named ports,
// with only Name and Ports, and the restartable (sidecar) init containers with named ports,
// likewise and their RestartPolicy.
type podPorts struct{ containers, initContainers []corev1.Container }

var (
	labelSets = newSharedValues(func(a, b *podLabels) bool { return maps.Equal(a.m, b.m) })
	portSets  = newSharedValues(samePorts)
	hashSeed  = maphash.MakeSeed()
)

func newCachedPod(o *corev1.Pod) *cachedPod {
	p := &cachedPod{
		name: o.Name, namespace: unique.Make(o.Namespace), resourceVersion: o.ResourceVersion,
		deletionTimestamp: o.DeletionTimestamp,
		nodeName:          unique.Make(o.Spec.NodeName),
		hostNetwork:       o.Spec.HostNetwork,
		phase:             unique.Make(o.Status.Phase),
		podIP:             o.Status.PodIP,
		podIPs:            o.Status.PodIPs,
	}
	if len(p.podIPs) > 0 && p.podIPs[0].IP == p.podIP {
		p.podIP = p.podIPs[0].IP
	}
	if !policy.Participates(o) {
		// Labels and ports matter only for pods that carry traffic; an update that makes the
		// pod take part arrives as a whole object and is converted again.
		return p
	}
	if len(o.Labels) > 0 {
		var h uint64
		for k, v := range o.Labels {
			h += maphash.Comparable(hashSeed, [2]string{k, v}) // a sum, as map order varies
		}
		p.labels = labelSets.share(h, &podLabels{o.Labels})
	}
	var ports podPorts
	for _, c := range o.Spec.Containers {
		if named := namedPorts(c.Ports); len(named) > 0 {
			ports.containers = append(ports.containers, corev1.Container{Name: c.Name, Ports: named})
		}
	}
	for _, c := range o.Spec.InitContainers {
		// Sidecars serve ports like containers do; other init containers name nothing.
		if policy.IsSidecar(&c) {
			if named := namedPorts(c.Ports); len(named) > 0 {
				ports.initContainers = append(ports.initContainers, corev1.Container{Name: c.Name, Ports: named, RestartPolicy: c.RestartPolicy})
			}
		}
	}
	if ports.containers != nil || ports.initContainers != nil {
		p.ports = portSets.share(ports.hash(), &ports)
	}
	return p
}

func (p *podPorts) hash() uint64 {
	var h maphash.Hash
	h.SetSeed(hashSeed)
	for _, cs := range [2][]corev1.Container{p.containers, p.initContainers} {
		for i := range cs {
			h.WriteString(cs[i].Name)
			for _, port := range cs[i].Ports {
				maphash.WriteComparable(&h, port)
			}
		}
		h.WriteByte(0)
	}
	return h.Sum64()
}

// samePorts reports whether two pods' named ports are the same; nil is none.
func samePorts(a, b *podPorts) bool {
	same := func(x, y []corev1.Container) bool {
		if len(x) != len(y) {
			return false
		}
		for i := range x {
			rx, ry := x[i].RestartPolicy, y[i].RestartPolicy
			if x[i].Name != y[i].Name || !slices.Equal(x[i].Ports, y[i].Ports) ||
				(rx == nil) != (ry == nil) || rx != nil && *rx != *ry {
				return false
			}
		}
		return true
	}
	ac, ai := a.get()
	bc, bi := b.get()
	return same(ac, bc) && same(ai, bi)
}

func (l *podLabels) get() map[string]string {
	if l == nil {
		return nil
	}
	return l.m
}

func (p *podPorts) get() (containers, initContainers []corev1.Container) {
	if p == nil {
		return nil, nil
	}
	return p.containers, p.initContainers
}

// pod rebuilds the corev1.Pod that policy.Compile reads. It shares the labels and containers
// with the cache entry, and so with other pods; both are only read.
func (p *cachedPod) pod() corev1.Pod {
	containers, initContainers := p.ports.get()
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: valueOf(p.namespace), ResourceVersion: p.resourceVersion,
			DeletionTimestamp: p.deletionTimestamp, Labels: p.labels.get()},
		Spec:   corev1.PodSpec{NodeName: valueOf(p.nodeName), HostNetwork: p.hostNetwork, Containers: containers, InitContainers: initContainers},
		Status: corev1.PodStatus{Phase: valueOf(p.phase), PodIP: p.podIP, PodIPs: p.podIPs},
	}
}

// DeepCopyObject makes cachedPod a runtime.Object, as the informer's store requires. The copy
// shares nothing, so it may be changed.
func (p *cachedPod) DeepCopyObject() runtime.Object {
	c := *p
	c.deletionTimestamp = p.deletionTimestamp.DeepCopy()
	if p.labels != nil {
		c.labels = &podLabels{maps.Clone(p.labels.m)}
	}
	if p.ports != nil {
		c.ports = &podPorts{copyContainers(p.ports.containers), copyContainers(p.ports.initContainers)}
	}
	c.podIPs = slices.Clone(p.podIPs)
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
func (p *cachedPod) GetNamespace() string                        { return valueOf(p.namespace) }
func (p *cachedPod) SetNamespace(namespace string)               { p.namespace = unique.Make(namespace) }
func (p *cachedPod) GetResourceVersion() string                  { return p.resourceVersion }
func (p *cachedPod) SetResourceVersion(version string)           { p.resourceVersion = version }
func (p *cachedPod) GetDeletionTimestamp() *metav1.Time          { return p.deletionTimestamp }
func (p *cachedPod) SetDeletionTimestamp(timestamp *metav1.Time) { p.deletionTimestamp = timestamp }
func (p *cachedPod) GetLabels() map[string]string                { return p.labels.get() }
func (p *cachedPod) SetLabels(labels map[string]string)          { p.labels = &podLabels{labels} } // the caller's: not shared

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

// valueOf is h's value; the zero Handle, of a cachedPod not made by newCachedPod, stands for
// the zero value.
func valueOf[T comparable](h unique.Handle[T]) T {
	if h == (unique.Handle[T]{}) {
		var zero T
		return zero
	}
	return h.Value()
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
	return p.nodeName == o.nodeName && p.hostNetwork == o.hostNetwork && p.phase == o.phase && p.podIP == o.podIP &&
		(p.deletionTimestamp == nil) == (o.deletionTimestamp == nil) && slices.Equal(p.podIPs, o.podIPs) &&
		(p.labels == o.labels || maps.Equal(p.labels.get(), o.labels.get())) &&
		(p.ports == o.ports || samePorts(p.ports, o.ports))
}
