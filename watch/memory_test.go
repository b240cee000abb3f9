package watch

import (
	"context"
	"fmt"
	"maps"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/sluice-dev/sluice/policy"
)

// memCluster is TestAPISourceScale's cluster without an API server: the pods as the API server
// stores them, protobuf-encoded, so that every read decodes fresh objects whose strings and
// maps are allocated one by one, as the client's decoder allocates them.
type memCluster struct {
	pods     [][]byte
	nss      []corev1.Namespace
	policies []networkingv1.NetworkPolicy
}

// newMemCluster makes the cluster of n pods. Rich pods carry what a Helm chart's pods carry
// besides: the recommended labels and a pod-template-hash (the same for every pod of an app and
// tier, as for the replicas of a Deployment), two more named ports and a sidecar with one.
func newMemCluster(t testing.TB, n int, rich bool) *memCluster {
	const namespaces, nodes = 20, 50
	c := &memCluster{pods: make([][]byte, n)}
	created := metav1.NewTime(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))
	always := corev1.ContainerRestartPolicyAlways
	for i := range n {
		app, tier := fmt.Sprintf("app-%d", i%40), []string{"web", "api", "db"}[i%3]
		p := podObj(fmt.Sprintf("ns-%d", i%namespaces), fmt.Sprintf("pod-%d", i), map[string]string{"app": app, "tier": tier},
			fmt.Sprintf("node-%d", i%nodes), corev1.ContainerPort{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP})
		if rich {
			maps.Copy(p.Labels, map[string]string{
				"app.kubernetes.io/name": app, "app.kubernetes.io/instance": app + "-prod", "app.kubernetes.io/version": "1.2.3",
				"app.kubernetes.io/component": tier, "app.kubernetes.io/part-of": "shop", "app.kubernetes.io/managed-by": "Helm",
				"helm.sh/chart": app + "-0.4.1", "pod-template-hash": fmt.Sprintf("%x", 0x5d4f8b7c9+i%120),
			})
			c := &p.Spec.Containers[0]
			c.Ports = append(c.Ports, corev1.ContainerPort{Name: "metrics", ContainerPort: 9090, Protocol: corev1.ProtocolTCP},
				corev1.ContainerPort{Name: "grpc", ContainerPort: 9000, Protocol: corev1.ProtocolTCP})
			p.Spec.InitContainers = []corev1.Container{{Name: "proxy", Image: "registry.example/proxy:1", RestartPolicy: &always,
				Ports: []corev1.ContainerPort{{Name: "admin", ContainerPort: 15000, Protocol: corev1.ProtocolTCP}}}}
		}
		// What the API server adds and the informer receives: identity, defaults, the managers.
		p.UID = types.UID(fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i))
		p.ResourceVersion = strconv.Itoa(1000 + 2*i)
		p.CreationTimestamp = created
		p.ManagedFields = []metav1.ManagedFieldsEntry{
			{Manager: "watch.test", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", Time: &created, FieldsType: "FieldsV1"},
			{Manager: "watch.test", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", Time: &created, FieldsType: "FieldsV1", Subresource: "status"},
		}
		p.Spec.RestartPolicy, p.Spec.DNSPolicy, p.Spec.SchedulerName = corev1.RestartPolicyAlways, corev1.DNSClusterFirst, corev1.DefaultSchedulerName
		p.Spec.Containers[0].TerminationMessagePath = corev1.TerminationMessagePathDefault
		p.Spec.Containers[0].ImagePullPolicy = corev1.PullIfNotPresent
		ip := fmt.Sprintf("10.%d.%d.%d", 100+i>>16, (i>>8)&255, i&255)
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, QOSClass: corev1.PodQOSBestEffort}
		b, err := p.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		c.pods[i] = b
	}
	for i := range namespaces {
		ns := fmt.Sprintf("ns-%d", i)
		c.nss = append(c.nss, corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, ResourceVersion: "1",
			Labels: map[string]string{"team": fmt.Sprintf("t%d", i%5), corev1.LabelMetadataName: ns}}})
		for _, tier := range []string{"web", "api", "db"} {
			c.policies = append(c.policies, networkingv1.NetworkPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: tier, ResourceVersion: "1"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": tier}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{
						From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "t1"}}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}}}},
						Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("http"))}},
					}},
				},
			})
		}
	}
	return c
}

func (c *memCluster) pod(t testing.TB, i int) *corev1.Pod {
	p := &corev1.Pod{}
	if err := p.Unmarshal(c.pods[i]); err != nil {
		t.Fatal(err)
	}
	return p
}

// client is a clientset that serves the cluster as the API server does to a reflector: a
// streaming watch-list (the initial objects one by one, decoded as they are sent, then the
// bookmark that ends them), after which the watch stays open and quiet.
func (c *memCluster) client(t testing.TB) *fake.Clientset {
	cs := fake.NewClientset()
	serve := func(resource string, n int, obj func(i int) (kruntime.Object, error), bookmark kruntime.Object) {
		cs.PrependWatchReactor(resource, func(a clienttesting.Action) (bool, watch.Interface, error) {
			ch := make(chan watch.Event)
			w := watch.NewProxyWatcher(ch)
			opts := a.(clienttesting.WatchActionImpl).GetListOptions()
			if opts.SendInitialEvents == nil || !*opts.SendInitialEvents {
				return true, w, nil
			}
			send := func(ev watch.Event) bool {
				select {
				case ch <- ev:
					return true
				case <-w.StopChan():
					return false
				}
			}
			go func() {
				for i := range n {
					o, err := obj(i)
					if err != nil {
						t.Error(err)
						return
					}
					if !send(watch.Event{Type: watch.Added, Object: o}) {
						return
					}
				}
				b := bookmark.DeepCopyObject()
				m, _ := meta.Accessor(b)
				m.SetResourceVersion("100000000")
				m.SetAnnotations(map[string]string{metav1.InitialEventsAnnotationKey: "true"})
				send(watch.Event{Type: watch.Bookmark, Object: b})
			}()
			return true, w, nil
		})
	}
	serve("pods", len(c.pods), func(i int) (kruntime.Object, error) {
		p := &corev1.Pod{}
		return p, p.Unmarshal(c.pods[i])
	}, &corev1.Pod{})
	serve("namespaces", len(c.nss), func(i int) (kruntime.Object, error) { return c.nss[i].DeepCopy(), nil }, &corev1.Namespace{})
	serve("networkpolicies", len(c.policies), func(i int) (kruntime.Object, error) { return c.policies[i].DeepCopy(), nil }, &networkingv1.NetworkPolicy{})
	return cs
}

// heapHeld is the live heap once the collector has freed what it can.
func heapHeld() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// entryBytes is what the cache entries of c's pods take each, and what of that is their own:
// the entry itself, its name, version and addresses, everything else being shared.
func entryBytes(t testing.TB, c *memCluster) (held, own int64) {
	h0 := heapHeld()
	entries := make([]any, len(c.pods))
	for i := range entries {
		entries[i], _ = trim(c.pod(t, i))
	}
	h1 := heapHeld()
	runtime.KeepAlive(c)
	n := int64(len(entries))
	for _, e := range entries {
		p := e.(*cachedPod)
		own += int64(unsafe.Sizeof(*p)) + int64(len(p.name)+len(p.resourceVersion))
		for _, ip := range p.podIPs {
			own += int64(unsafe.Sizeof(ip)) + int64(len(ip.IP))
		}
	}
	// Less the interface that holds each in entries.
	return (int64(h1)-int64(h0))/n - 16, own / n
}

// TestAPISourceMemory measures what the API source holds per pod, part by part, on
// TestAPISourceScale's cluster served without an API server: the cache entries alone, the
// informers holding them, then the Builder's first build, and the snapshot alone.
// SLUICE_MEM_PODS sets the pods (default 20000); SLUICE_HEAP_PROFILE=FILE writes the heap
// profile at the moment the source holds everything (every allocation sampled), for
// `go tool pprof -sample_index=inuse_space -top FILE`.
func TestAPISourceMemory(t *testing.T) {
	n := 20000
	if v := os.Getenv("SLUICE_MEM_PODS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1000 || n > 200000 {
			t.Fatalf("SLUICE_MEM_PODS=%q: want a count between 1000 and 200000", v)
		}
	}
	profile := os.Getenv("SLUICE_HEAP_PROFILE")
	if profile != "" {
		defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
		runtime.MemProfileRate = 1
	}
	c := newMemCluster(t, n, false)
	perPod := func(from, to uint64) int64 { return (int64(to) - int64(from)) / int64(n) }

	entry, own := entryBytes(t, c)
	// Small allocations round up (a name's 9 bytes take 16): half again is room for that and
	// nothing else, while a label map or a container of a pod's own would be 300 bytes more.
	if entry > own*3/2 {
		t.Errorf("a cache entry takes %d bytes, more than half again the %d of what is its own: something is held per pod that pods could share, or need not be held", entry, own)
	}
	// What a workload's pods have in common is held once: more of it costs a pod nothing, but
	// for allocator noise: strings under 16 bytes are packed into 16-byte blocks with whatever
	// else is allocated meanwhile, so a pod whose decoding allocates more between its kept
	// strings keeps more blocks.
	if rich, _ := entryBytes(t, newMemCluster(t, n, true)); rich-entry > 32 {
		t.Errorf("a cache entry of a pod with 8 more labels and 3 more named ports its workload's pods share takes %d bytes, %d more than without: they are not shared",
			rich, rich-entry)
	}

	client := c.client(t) // before the measure: a fake clientset holds a megabyte of its own
	h0 := heapHeld()
	s := NewAPISource(nil, policy.Options{Node: "node-0"}, testLogger(t), 0)
	if err := s.setup(client); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for _, inf := range s.informers {
		wg.Go(func() { inf.RunWithContext(ctx) })
	}
	syncCtx, stop := context.WithTimeout(ctx, time.Minute)
	defer stop()
	if !cache.WaitForCacheSync(syncCtx.Done(), append([]cache.InformerSynced{s.pods.HasSynced, s.nss.HasSynced, s.pols.HasSynced}, s.synced...)...) {
		t.Fatal("the informers did not sync within a minute")
	}
	// The handlers marked every object of the first list changed; the first build takes those
	// marks (Run), so they are not held.
	s.mu.Lock()
	s.dirtyPods, s.dirtyPols, s.dirtyNSs = make(map[string]struct{}), make(map[string]struct{}), make(map[string]struct{})
	s.mu.Unlock()
	h1 := heapHeld()
	informers := perPod(h0, h1)

	b := policy.NewBuilderOn(s.opt, apiObjects{s})
	snap, err := b.Build(1)
	if err != nil {
		t.Fatal(err)
	}
	h2 := heapHeld()
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if st := snap.Stats(); st.Pods != n {
		t.Fatalf("the snapshot has %d pods, want %d", st.Pods, n)
	}
	built := perPod(h1, h2)
	runtime.KeepAlive(b)

	// The snapshot alone, compiled from the same objects; what the Builder holds besides is
	// its indexes (and the compiler state it keeps for patching).
	h3 := heapHeld()
	alone, err := policy.Compile(s.state(), s.opt)
	if err != nil {
		t.Fatal(err)
	}
	h4 := heapHeld()
	snapshot := perPod(h3, h4)
	runtime.KeepAlive(alone)

	t.Logf("pods=%d, bytes/pod held: cache entry %d (its own %d), informers' other overhead %d (informers in all %d); Builder indexes %d, snapshot %d (first build in all %d); source in all %d",
		n, entry, own, informers-entry, informers, built-snapshot, snapshot, built, informers+built)
}
