package watch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/sluice-dev/sluice/policy"
)

// APISource watches Pods, Namespaces and NetworkPolicies through client-go informers and
// publishes a snapshot after every burst of changes.
//
// Guarantees the agent relies on:
//   - Nothing is published before all three informers have completed their first list; until
//     then Ready is false and the agent accepts (it never drops for lack of state).
//   - When the API server is unreachable the last snapshot stays in force, Stale reports true and
//     sluice_watch_stale / sluice_watch_stale_seconds say so; the informers relist or resume
//     their watches when it returns, and the changes made meanwhile are published.
//   - An object that does not compile never crashes the source and never opens traffic: a
//     NetworkPolicy that fails to compile (policy.Options.IsolateInvalid) isolates the pods it
//     selects (all pods of its namespace when its pod selector is the broken part) for the
//     directions it declares, with no rules. Removing the policy is the safe default of
//     NetworkPolicy only for policies that never applied; for one that did, dropping it would
//     allow what it denied.
type APISource struct {
	// Persist, when its Path is set, writes the state of each published snapshot to a
	// node-local file (rate-limited, and once more when Run returns); LoadPersisted reads it
	// back. Set it before Run.
	Persist Persist

	cfg      *rest.Config
	opt      policy.Options
	log      *slog.Logger
	debounce time.Duration

	ready atomic.Bool

	mu        sync.Mutex
	dirtyAt   time.Time           // when the oldest change not yet built was seen; zero when none
	dirtyPods map[string]struct{} // namespace/name of the pods changed since the last build
	dirtyPols map[string]struct{} // likewise for policies
	dirtyNSs  map[string]struct{} // and the names of namespaces
	dirtyAll  bool                // a change without a key: compile everything
	kick      chan struct{}
	unhealthy map[string]error  // resource -> last list/watch error, while it lasts
	badSeen   map[string]string // policy key -> resourceVersion already reported as invalid
	staleAt   time.Time

	informers []cache.SharedIndexInformer
	synced    []cache.InformerSynced // the event handlers' registrations
	pods      cache.SharedIndexInformer
	nss       cache.SharedIndexInformer
	pols      cache.SharedIndexInformer
}

// NewAPISource returns a source that watches the API server cfg points at. opt.Node selects the
// local pods (pods of every node are watched, since remote pods are peers of local ones);
// debounce is the longest time between two builds under churn (DefaultDebounce when <= 0; see
// nextBuildWait): a change after an idle window is built at once.
// opt.IsolateInvalid is always set: see APISource.
func NewAPISource(cfg *rest.Config, opt policy.Options, log *slog.Logger, debounce time.Duration) *APISource {
	if log == nil {
		log = slog.Default()
	}
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	opt.IsolateInvalid = true
	return &APISource{
		cfg: cfg, opt: opt, log: log.With("source", "api"), debounce: debounce,
		kick:      make(chan struct{}, 1),
		dirtyPods: make(map[string]struct{}),
		dirtyPols: make(map[string]struct{}),
		dirtyNSs:  make(map[string]struct{}),
		unhealthy: make(map[string]error),
		badSeen:   make(map[string]string),
	}
}

// Ready reports whether the first complete snapshot has been published.
func (s *APISource) Ready() bool { return s.ready.Load() }

// Stale reports whether a list or watch is failing, and since when. While stale, the snapshot in
// force is the last one built before the failure.
func (s *APISource) Stale() (bool, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.unhealthy) > 0, s.staleAt
}

// Run watches until ctx is done. It returns an error only when the client cannot be built; an
// API server that is down at start is waited for (Ready stays false).
func (s *APISource) Run(ctx context.Context, publish func(*policy.Snapshot)) error {
	cfg := rest.CopyConfig(s.cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = "sluice-agent"
	}
	// Protobuf halves list sizes and decode time for tens of thousands of pods.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("building the Kubernetes client: %w (check --kubeconfig or the in-cluster service account)", err)
	}
	if err := s.setup(client); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, inf := range s.informers {
		wg.Add(1)
		go func() { defer wg.Done(); inf.RunWithContext(ctx) }()
	}
	defer wg.Wait()
	defer cancel()

	s.log.Info("waiting for the first full list of pods, namespaces and networkpolicies")
	// The handlers' HasSynced too: they receive the initial list's events after the caches
	// hold it, and those events must be in the first build, which compiles everything, not
	// mark the second one (a namespace among them would make it compile everything again).
	if !cache.WaitForCacheSync(ctx.Done(), append([]cache.InformerSynced{s.pods.HasSynced, s.nss.HasSynced, s.pols.HasSynced}, s.synced...)...) {
		return nil // ctx done
	}
	s.log.Info("caches synced", "pods", len(s.pods.GetStore().ListKeys()),
		"namespaces", len(s.nss.GetStore().ListKeys()), "networkpolicies", len(s.pols.GetStore().ListKeys()))

	pub := newPublisher("api", s.opt, s.log)
	// The Builder patches the last snapshot for pod and policy changes, reading the informers'
	// caches; the first build compiles everything.
	b := policy.NewBuilderOn(s.opt, apiObjects{s})
	var store *persister
	// persistC fires when the state of the snapshot in force has not been offered to the
	// persister yet and it may write again: building the state of a large cluster allocates
	// a copy of every pod, which only the writes that happen need.
	var persistC <-chan time.Time
	offer := func(gen uint64) {
		store.offer(b.State(), gen)
		persistC = nil
	}
	if s.Persist.Path != "" {
		store = newPersister(s.Persist, s.log)
		// Its own context: the last write happens after ctx is done, and Run waits for it.
		storeCtx, stop := context.WithCancel(context.Background())
		go store.run(storeCtx)
		defer func() { stop(); <-store.done }()
	}
	var last time.Time     // when the last build started
	var took time.Duration // how long it took
	first := true
	for {
		if !first {
			select {
			case <-ctx.Done():
				if persistC != nil {
					offer(pub.gen)
				}
				return nil
			case <-persistC:
				offer(pub.gen)
				continue
			case <-s.kick:
			}
			// Idle, the change is built at once; under churn, builds are spaced by a window
			// that follows their cost, which bounds the delay of any change to a window plus a
			// build and the builds' share of a core (see nextBuildWait).
			if wait := nextBuildWait(time.Now(), last, took, s.debounce); wait > 0 {
				t := time.NewTimer(wait)
				select {
				case <-ctx.Done():
					t.Stop()
					if persistC != nil {
						offer(pub.gen)
					}
					return nil
				case <-t.C:
				}
			}
		}
		// Drain the wake-up before taking the changes: a change that lands in between is then
		// either in this build or wakes the next one, never lost and never mis-timed.
		select {
		case <-s.kick:
		default:
		}
		s.mu.Lock()
		at := s.dirtyAt
		s.dirtyAt = time.Time{}
		pods, pols, nss, all := s.dirtyPods, s.dirtyPols, s.dirtyNSs, s.dirtyAll
		s.dirtyPods, s.dirtyPols, s.dirtyNSs, s.dirtyAll = make(map[string]struct{}), make(map[string]struct{}), make(map[string]struct{}), false
		s.mu.Unlock()
		for k := range pods {
			ns, name, _ := cache.SplitMetaNamespaceKey(k)
			b.PodChanged(ns, name)
		}
		for k := range pols {
			ns, name, _ := cache.SplitMetaNamespaceKey(k)
			b.PolicyChanged(ns, name)
		}
		for k := range nss {
			b.NamespaceChanged(k)
		}
		if all {
			b.CompileAll()
		}

		last = time.Now()
		snap, err := s.build(pub, b)
		took = time.Since(last)
		if err != nil {
			s.log.Error("cluster state does not compile; the last snapshot stays in force", "err", err, "generation", pub.gen)
			continue
		}
		publish(snap)
		if store != nil {
			if wait := store.wait(); wait <= 0 {
				offer(snap.Generation())
			} else if persistC == nil {
				persistC = time.After(wait)
			}
		}
		if first {
			pub.published(snap, time.Time{})
			s.ready.Store(true)
			first = false
		} else {
			pub.published(snap, at)
		}
	}
}

// nextBuildWait is how long to wait before building after a change seen at now, the last
// build having started at last and taken took: nothing when the source was idle for the
// window since, else the rest of the window. The window is buildSpacing times the last
// build, so that under any churn builds take at most 1/buildSpacing of a core, within
// [minBuildWindow, debounce]: a patch of a few hundred microseconds is followed by the next
// one 10 ms later, a full compile of a second by the next one a debounce later.
func nextBuildWait(now, last time.Time, took, debounce time.Duration) time.Duration {
	if last.IsZero() {
		return 0
	}
	window := min(debounce, max(minBuildWindow, buildSpacing*took))
	return max(0, last.Add(window).Sub(now))
}

const (
	buildSpacing   = 20
	minBuildWindow = 10 * time.Millisecond
)

// apiObjects is what a Builder reads of the informers' caches. Their objects are shared with
// the informers, so they are only read.
type apiObjects struct{ s *APISource }

func (o apiObjects) Pod(ref policy.PodRef) *corev1.Pod {
	obj, ok, _ := o.s.pods.GetStore().GetByKey(ref.Namespace + "/" + ref.Name)
	if !ok {
		return nil
	}
	cp, ok := obj.(*cachedPod)
	if !ok {
		return nil
	}
	p := cp.pod()
	return &p
}

func (o apiObjects) Policy(ref policy.PodRef) *networkingv1.NetworkPolicy {
	obj, ok, _ := o.s.pols.GetStore().GetByKey(ref.Namespace + "/" + ref.Name)
	if !ok {
		return nil
	}
	np, _ := obj.(*networkingv1.NetworkPolicy)
	return np
}

func (o apiObjects) Namespace(name string) *corev1.Namespace {
	obj, ok, _ := o.s.nss.GetStore().GetByKey(name)
	if !ok {
		return nil
	}
	ns, _ := obj.(*corev1.Namespace)
	return ns
}

func (o apiObjects) State() *policy.State { return o.s.state() }

// setup builds the three informers, each on a list/watch wrapper that records health.
func (s *APISource) setup(client kubernetes.Interface) error {
	core, netv1 := client.CoreV1(), client.NetworkingV1()
	s.pods = s.informer("pods", &corev1.Pod{}, &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return core.Pods("").List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return core.Pods("").Watch(ctx, o)
		},
	})
	s.nss = s.informer("namespaces", &corev1.Namespace{}, &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return core.Namespaces().List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return core.Namespaces().Watch(ctx, o)
		},
	})
	s.pols = s.informer("networkpolicies", &networkingv1.NetworkPolicy{}, &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return netv1.NetworkPolicies("").List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return netv1.NetworkPolicies("").Watch(ctx, o)
		},
	})
	for _, inf := range s.informers {
		if err := inf.SetTransform(trim); err != nil {
			return err
		}
		dirty := func(obj any) { s.changed(inf, obj) }
		reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: dirty,
			UpdateFunc: func(old, cur any) {
				if !relevantChange(old, cur) {
					return
				}
				dirty(cur)
			},
			DeleteFunc: dirty,
		})
		if err != nil {
			return err
		}
		s.synced = append(s.synced, reg.HasSynced)
	}
	return nil
}

func (s *APISource) informer(resource string, example runtime.Object, lw *cache.ListWatch) cache.SharedIndexInformer {
	// The reflector retries a refused watch by itself without calling the watch error handler,
	// so health is recorded here, where every list and watch call passes.
	wrapped := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			obj, err := lw.ListWithContextFunc(ctx, o)
			s.health(ctx, resource, err)
			return obj, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := lw.WatchFuncWithContext(ctx, o)
			s.health(ctx, resource, err)
			return w, err
		},
	}
	inf := cache.NewSharedIndexInformerWithOptions(wrapped, example, cache.SharedIndexInformerOptions{ObjectDescription: resource})
	_ = inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, _ *cache.Reflector, err error) {
		s.health(ctx, resource, err)
	})
	s.informers = append(s.informers, inf)
	return inf
}

// health records the outcome of a list or watch call for resource.
func (s *APISource) health(ctx context.Context, resource string, err error) {
	if err != nil && ctx.Err() != nil {
		return // shutting down
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, wasBad := s.unhealthy[resource]
	if err != nil {
		metricErrors.WithLabelValues("api", "watch").Inc()
		if len(s.unhealthy) == 0 {
			s.staleAt = time.Now()
			staleSinceNanos.Store(s.staleAt.UnixNano())
			metricStale.WithLabelValues("api").Set(1)
		}
		s.unhealthy[resource] = err
		if !wasBad {
			s.log.Warn("lost the API server; the last snapshot stays in force until the watch resumes",
				"resource", resource, "err", err)
		} else {
			s.log.Debug("list/watch still failing", "resource", resource, "err", err)
		}
		return
	}
	if !wasBad {
		return
	}
	delete(s.unhealthy, resource)
	if len(s.unhealthy) == 0 {
		s.log.Info("API server reachable again; watches resumed", "stale_for", time.Since(s.staleAt).Round(time.Millisecond).String())
		s.staleAt = time.Time{}
		staleSinceNanos.Store(0)
		metricStale.WithLabelValues("api").Set(0)
	}
}

// changed records that obj of informer inf changed now and wakes the build loop.
func (s *APISource) changed(inf cache.SharedIndexInformer, obj any) {
	now := time.Now()
	// A deletion may hand over a tombstone; its key is the object's.
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	s.mu.Lock()
	switch {
	case err != nil:
		// An object without a key cannot be found again: build everything from the caches.
		s.log.Warn("a changed object has no namespace/name key; compiling everything", "err", err)
		s.dirtyAll = true
	case inf == s.nss:
		s.dirtyNSs[key] = struct{}{}
	case inf == s.pods:
		s.dirtyPods[key] = struct{}{}
	case inf == s.pols:
		s.dirtyPols[key] = struct{}{}
	}
	if s.dirtyAt.IsZero() {
		s.dirtyAt = now
	}
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// state copies the informers' caches into a policy.State. The cached objects are shared with
// the informers, so they are only read.
func (s *APISource) state() *policy.State {
	st := &policy.State{}
	for _, o := range s.nss.GetStore().List() {
		if ns, ok := o.(*corev1.Namespace); ok {
			st.Namespaces = append(st.Namespaces, *ns)
		}
	}
	pods := s.pods.GetStore().List()
	st.Pods = make([]corev1.Pod, 0, len(pods))
	for _, o := range pods {
		if p, ok := o.(*cachedPod); ok {
			st.Pods = append(st.Pods, p.pod())
		}
	}
	for _, o := range s.pols.GetStore().List() {
		if np, ok := o.(*networkingv1.NetworkPolicy); ok {
			st.Policies = append(st.Policies, *np)
		}
	}
	return st
}

// build builds the next snapshot with b, isolating the policies that do not compile (see
// APISource) and reporting each once per version of the object.
func (s *APISource) build(pub *publisher, b *policy.Builder) (*policy.Snapshot, error) {
	snap, err := pub.build(b)
	return s.accept(snap, err, func(key string) string {
		if np := (apiObjects{s}).policyByKey(key); np != nil {
			return np.ResourceVersion
		}
		return ""
	})
}

// accept reports the policies of a CompileError that came with snap; version gives a policy's
// resourceVersion by namespace/name.
func (s *APISource) accept(snap *policy.Snapshot, err error, version func(key string) string) (*policy.Snapshot, error) {
	var ce *policy.CompileError
	if err != nil && (snap == nil || !errors.As(err, &ce)) {
		return nil, err
	}
	var bad []policy.PolicyError
	if ce != nil {
		bad = ce.Policies
	}
	s.reportBad(version, bad)
	return snap, nil
}

func (o apiObjects) policyByKey(key string) *networkingv1.NetworkPolicy {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	return o.Policy(policy.PodRef{Namespace: ns, Name: name})
}

// reportBad logs each policy of bad whose version was not reported yet, and each policy reported
// before that compiles now (fixed or deleted).
func (s *APISource) reportBad(version func(key string) string, bad []policy.PolicyError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(bad) == 0 && len(s.badSeen) == 0 {
		return
	}
	now := make(map[string]bool, len(bad))
	for i := range bad {
		b := &bad[i]
		now[b.Policy] = true
		rv := version(b.Policy)
		if seen, ok := s.badSeen[b.Policy]; ok && seen == rv {
			continue // reported already; the object has not changed
		}
		s.badSeen[b.Policy] = rv
		metricErrors.WithLabelValues("api", "object").Inc()
		s.log.Error("NetworkPolicy does not compile; the pods it selects stay isolated with none of its rules until it is fixed",
			"policy", b.Policy, "resource_version", rv, "field", b.Field, "err", b.Err)
	}
	fixed := make([]string, 0, len(s.badSeen))
	for k := range s.badSeen {
		if !now[k] {
			fixed = append(fixed, k)
		}
	}
	sort.Strings(fixed)
	for _, k := range fixed {
		delete(s.badSeen, k)
		s.log.Info("NetworkPolicy compiles again (fixed or deleted)", "policy", k)
	}
}

// trim keeps only what policy needs of an object, so tens of thousands of pods fit in little
// memory: no managedFields, annotations (kubectl's last-applied copy can be kilobytes), status
// conditions, volumes, env; pods become cachedPods. It may see an object it trimmed already, so
// it is idempotent. A pod's entry may keep its labels map as the one every pod with those labels
// shares, so the object must not be changed afterwards (the informer drops it).
func trim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return newCachedPod(o), nil
	case *cachedPod:
		return o, nil
	case *corev1.Namespace:
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.Name, UID: o.UID, ResourceVersion: o.ResourceVersion, Labels: o.Labels}}, nil
	case *networkingv1.NetworkPolicy:
		return &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion, Generation: o.Generation},
			Spec:       o.Spec,
		}, nil
	}
	return obj, nil
}

// namedPorts keeps the ports a policy can name; unnamed ones are matched by number alone.
func namedPorts(in []corev1.ContainerPort) []corev1.ContainerPort {
	var out []corev1.ContainerPort
	for _, p := range in {
		if p.Name != "" {
			out = append(out, corev1.ContainerPort{Name: p.Name, ContainerPort: p.ContainerPort, Protocol: p.Protocol})
		}
	}
	return out
}

// relevantChange reports whether an update changed anything policy reads. Pods are updated
// often for reasons policy ignores (conditions, container statuses); after trim those updates
// differ only in resourceVersion.
func relevantChange(old, cur any) bool {
	switch o := old.(type) {
	case *cachedPod:
		c, ok := cur.(*cachedPod)
		return !ok || !o.samePolicyView(c)
	case *corev1.Namespace:
		c, ok := cur.(*corev1.Namespace)
		return !ok || !apiequality.Semantic.DeepEqual(o.Labels, c.Labels)
	case *networkingv1.NetworkPolicy:
		c, ok := cur.(*networkingv1.NetworkPolicy)
		return !ok || !apiequality.Semantic.DeepEqual(o.Spec, c.Spec)
	}
	return true
}
