package watch

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluice-dev/sluice/policy"
	"github.com/sluice-dev/sluice/watch/kubetest"
)

// inForce is what the agent does with published snapshots: one atomic pointer, plus (for the
// test) when each generation arrived.
type inForce struct {
	cur atomic.Pointer[policy.Snapshot]
	mu  sync.Mutex
	at  map[uint64]time.Time
}

func (f *inForce) publish(s *policy.Snapshot) {
	f.mu.Lock()
	if f.at == nil {
		f.at = make(map[uint64]time.Time)
	}
	f.at[s.Generation()] = time.Now()
	f.mu.Unlock()
	if old := f.cur.Load(); old != nil && s.Generation() <= old.Generation() {
		panic(fmt.Sprintf("generation went from %d to %d", old.Generation(), s.Generation()))
	}
	f.cur.Store(s)
}

func (f *inForce) publishedAt(gen uint64) time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.at[gen]
}

// waitDecision waits (bounded) until the snapshot in force decides fl as want, and returns the
// time from since to the publication of the first snapshot that does.
func (f *inForce) waitDecision(t *testing.T, what string, since time.Time, fl policy.Flow, want bool) time.Duration {
	t.Helper()
	return f.waitDecisionQuiet(t, what, since, fl, want, false)
}

// waitDecisionQuiet is waitDecision, logging the outcome unless quiet.
func (f *inForce) waitDecisionQuiet(t *testing.T, what string, since time.Time, fl policy.Flow, want, quiet bool) time.Duration {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if s := f.cur.Load(); s != nil {
			if v := s.Decide(fl); v.Allowed == want {
				d := f.publishedAt(s.Generation()).Sub(since)
				if d < 0 { // the snapshot was already right before the change (should not happen)
					t.Errorf("%s: decision was already %v before the change", what, want)
				}
				if !quiet {
					t.Logf("%-48s -> allowed=%-5v in force after %v (generation %d)", what, want, d.Round(time.Millisecond), s.Generation())
				}
				return d
			}
		}
		if time.Now().After(deadline) {
			s := f.cur.Load()
			var expl any = "no snapshot"
			if s != nil {
				expl = s.Explain(fl)
			}
			t.Fatalf("%s: %v->%v %v/%d not allowed=%v within 20 s; last snapshot says %+v", what, fl.Src, fl.Dst, fl.Proto, fl.Port, want, expl)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func tcp(src, dst string, port uint16) policy.Flow {
	return policy.Flow{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: policy.TCP, Port: port}
}

func mkNS(t testing.TB, ctx context.Context, c kubernetes.Interface, name string, labels map[string]string) {
	t.Helper()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func podObj(ns, name string, labels map[string]string, node string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels,
			Annotations: map[string]string{"example.com/bulk": "annotations are dropped by the transform"}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "registry.example/app:1", Ports: ports}}},
	}
}

// mkPod creates a pod and gives it ip through the status subresource (no kubelet runs).
func mkPod(t testing.TB, ctx context.Context, c kubernetes.Interface, p *corev1.Pod, ip string) {
	t.Helper()
	created, err := c.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	setIP(t, ctx, c, created, ip)
}

func setIP(t testing.TB, ctx context.Context, c kubernetes.Interface, p *corev1.Pod, ip string) {
	t.Helper()
	p = p.DeepCopy()
	p.Status.Phase = corev1.PodRunning
	p.Status.PodIP = ip
	p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	if _, err := c.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func patch(t *testing.T, ctx context.Context, do func() error) time.Time {
	t.Helper()
	start := time.Now()
	if err := do(); err != nil {
		t.Fatal(err)
	}
	return start
}

func mergePatch(s string) []byte { return []byte(s) }

func TestAPISourceAgainstRealAPIServer(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	mkNS(t, ctx, c, "shop", map[string]string{"team": "shop"})
	mkNS(t, ctx, c, "other", nil)
	pg := corev1.ContainerPort{Name: "pg", ContainerPort: 5432, Protocol: corev1.ProtocolTCP}
	mkPod(t, ctx, c, podObj("shop", "web", map[string]string{"tier": "frontend"}, "node-a"), "10.244.1.10")
	mkPod(t, ctx, c, podObj("shop", "db", map[string]string{"tier": "database"}, "node-a", pg), "10.244.1.20")
	mkPod(t, ctx, c, podObj("other", "client", nil, "node-b"), "10.244.2.30")

	src := NewAPISource(env.Config, policy.Options{Node: "node-a"}, testLogger(t), 50*time.Millisecond)
	persisted := filepath.Join(t.TempDir(), "last-good.state")
	src.Persist = Persist{Path: persisted, Every: 100 * time.Millisecond, Version: "test-1"}
	var f inForce
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx, f.publish) }()
	defer func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30 s of cancel")
		}
	}()

	eventually(t, "the source is ready", src.Ready)
	s := f.cur.Load()
	if st := s.Stats(); st.Pods != 3 || st.LocalPods != 2 || st.Namespaces < 2 {
		t.Errorf("first snapshot stats %+v, want 3 pods, 2 local (node-a), >= 2 namespaces", st)
	}
	webDB := tcp("10.244.1.10", "10.244.1.20", 5432)
	clientDB := tcp("10.244.2.30", "10.244.1.20", 5432)
	if v := s.Decide(webDB); !v.Allowed || v.Reason != policy.ReasonUnisolated {
		t.Fatalf("web->db without policies: %v", v)
	}

	var props []time.Duration
	step := func(what string, since time.Time, fl policy.Flow, want bool) {
		t.Helper()
		props = append(props, f.waitDecision(t, what, since, fl, want))
	}

	// A policy: the database takes the frontend pods and namespaces labelled trusted, on its
	// named port.
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "database"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "frontend"}}},
					{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"trusted": "yes"}}},
				},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("pg"))}},
			}},
		},
	}
	at := patch(t, ctx, func() error {
		_, err := c.NetworkingV1().NetworkPolicies("shop").Create(ctx, np, metav1.CreateOptions{})
		return err
	})
	step("policy created: other/client -> db denied", at, clientDB, false)
	if v := f.cur.Load().Decide(webDB); !v.Allowed || v.Reason != policy.ReasonRule {
		t.Fatalf("web->db:5432 with the policy: %v, want allowed by rule", v)
	}
	if v := f.cur.Load().Decide(tcp("10.244.1.10", "10.244.1.20", 80)); v.Allowed {
		t.Fatalf("web->db:80 with the policy: %v, want denied", v)
	}

	// Namespace label change.
	at = patch(t, ctx, func() error {
		_, err := c.CoreV1().Namespaces().Patch(ctx, "other", types.MergePatchType, mergePatch(`{"metadata":{"labels":{"trusted":"yes"}}}`), metav1.PatchOptions{})
		return err
	})
	step("namespace other labelled trusted: client -> db", at, clientDB, true)

	// Pod label change.
	at = patch(t, ctx, func() error {
		_, err := c.CoreV1().Pods("shop").Patch(ctx, "web", types.MergePatchType, mergePatch(`{"metadata":{"labels":{"tier":"batch"}}}`), metav1.PatchOptions{})
		return err
	})
	step("pod web relabelled tier=batch: web -> db", at, webDB, false)

	// Pod IP change: the old address becomes a stranger, the new one is the trusted client.
	newClient := tcp("10.244.2.31", "10.244.1.20", 5432)
	if v := f.cur.Load().Decide(newClient); v.Allowed {
		t.Fatalf("10.244.2.31 (no pod yet) -> db: %v, want denied", v)
	}
	at = patch(t, ctx, func() error {
		p, err := c.CoreV1().Pods("other").Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			return err
		}
		setIP(t, ctx, c, p, "10.244.2.31")
		return nil
	})
	step("pod client IP .30 -> .31: new IP -> db", at, newClient, true)
	if v := f.cur.Load().Decide(clientDB); v.Allowed {
		t.Errorf("old client IP .30 -> db after the IP change: %v, want denied", v)
	}

	// Policy deletion: nothing isolates the database any more.
	at = patch(t, ctx, func() error {
		return c.NetworkingV1().NetworkPolicies("shop").Delete(ctx, "db", metav1.DeleteOptions{})
	})
	step("policy deleted: web -> db", at, webDB, true)

	// Outage: a deny-all holds while the API server is down, and changes after it comes back
	// are seen.
	denyAll := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "deny-all"},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	}
	at = patch(t, ctx, func() error {
		_, err := c.NetworkingV1().NetworkPolicies("shop").Create(ctx, denyAll, metav1.CreateOptions{})
		return err
	})
	step("deny-all created: web -> db", at, webDB, false)
	genBefore := f.cur.Load().Generation()
	eventually(t, "the state in force is persisted", func() bool {
		_, info, err := LoadPersisted(persisted, policy.Options{Node: "node-a"})
		return err == nil && info.Generation == genBefore
	})

	env.StopAPIServer()
	eventually(t, "the source reports stale after the API server stopped", func() bool { st, _ := src.Stale(); return st })
	if got := metricValue(metricStale.WithLabelValues("api")); got != 1 {
		t.Errorf("sluice_watch_stale{source=api} = %v during the outage, want 1", got)
	}
	// A few seconds of outage: the informers retry, and the snapshot must not change.
	time.Sleep(3 * time.Second)
	if s := f.cur.Load(); s.Generation() != genBefore || s.Decide(webDB).Allowed {
		t.Fatalf("during the outage: generation %d (was %d), web->db %v; the last policy must hold", s.Generation(), genBefore, s.Decide(webDB))
	}
	if staleSeconds() <= 0 {
		t.Errorf("sluice_watch_stale_seconds is %v during the outage", staleSeconds())
	}
	t.Logf("watch errors counted during the outage: %v", metricValue(metricErrors.WithLabelValues("api", "watch")))
	// An agent restarting now finds the persisted state: the same decisions as the snapshot in
	// force, the deny-all included.
	last, info, err := LoadPersisted(persisted, policy.Options{Node: "node-a"})
	if err != nil {
		t.Fatalf("loading the persisted state during the outage: %v", err)
	}
	if info.Generation != genBefore || info.SluiceVersion != "test-1" || info.Pods != 3 || last.Generation() != genBefore {
		t.Errorf("persisted header %+v, snapshot generation %d; want generation %d, version test-1, 3 pods", info, last.Generation(), genBefore)
	}
	for _, fl := range []policy.Flow{webDB, clientDB, newClient, tcp("10.244.1.20", "10.244.1.10", 80)} {
		if got, want := last.Decide(fl), f.cur.Load().Decide(fl); got != want {
			t.Errorf("persisted snapshot decides %s -> %s:%d as %+v, the snapshot in force %+v", fl.Src, fl.Dst, fl.Port, got, want)
		}
	}

	env.StartAPIServer()
	// The change is made after the restart; the informers must resume and deliver it.
	at = patch(t, ctx, func() error {
		return c.NetworkingV1().NetworkPolicies("shop").Delete(ctx, "deny-all", metav1.DeleteOptions{})
	})
	f.waitDecision(t, "after API server restart, deny-all deleted", at, webDB, true)
	eventually(t, "the source is no longer stale", func() bool { st, _ := src.Stale(); return !st })
	if got := metricValue(metricStale.WithLabelValues("api")); got != 0 {
		t.Errorf("sluice_watch_stale{source=api} = %v after resync, want 0", got)
	}

	var sum time.Duration
	for _, d := range props {
		sum += d
	}
	t.Logf("propagation (API call -> snapshot in force), %d changes, debounce 50ms: mean %v", len(props), (sum / time.Duration(len(props))).Round(time.Millisecond))
}

func ptr[T any](v T) *T { return &v }

// TestAPISourceScale creates many pods and policies through the API server and reports the
// memory the source holds, the bytes and time to its first snapshot, the propagation of label
// changes (API call -> snapshot in force) idle and under a sustained churn of pod changes, and
// the source's CPU during that churn. The counts are settable (defaults keep `make test`
// quick; the README's figures used SLUICE_SCALE_PODS=100000 SLUICE_SCALE_POLICIES=10000
// SLUICE_SCALE_CHANGES=200 SLUICE_SCALE_CHURN_SECONDS=30):
//
//	SLUICE_SCALE_PODS           pods (default 2000, at most 100000)
//	SLUICE_SCALE_POLICIES       policies (default and least 60: the probe's three per namespace)
//	SLUICE_SCALE_CHANGES        idle label changes measured (default 6)
//	SLUICE_SCALE_CHURN_SECONDS  seconds of 100 pod changes per second (default 2)
func TestAPISourceScale(t *testing.T) {
	setting := func(name string, def, lo, hi int) int {
		v := os.Getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			t.Fatalf("%s=%q: want a count between %d and %d", name, v, lo, hi)
		}
		return n
	}
	n := setting("SLUICE_SCALE_PODS", 2000, 1, 100000)
	nPolicies := setting("SLUICE_SCALE_POLICIES", 60, 60, 20000)
	nChanges := setting("SLUICE_SCALE_CHANGES", 6, 2, 10000)
	churnFor := time.Duration(setting("SLUICE_SCALE_CHURN_SECONDS", 2, 0, 600)) * time.Second
	env := kubetest.Start(t)
	c := env.Client
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	const namespaces, nodes = 20, 50
	for i := range namespaces {
		mkNS(t, ctx, c, fmt.Sprintf("ns-%d", i), map[string]string{"team": fmt.Sprintf("t%d", i%5)})
	}
	start := time.Now()
	inParallel(t, ctx, n, func(i int) error {
		p := podObj(fmt.Sprintf("ns-%d", i%namespaces), fmt.Sprintf("pod-%d", i),
			map[string]string{"app": fmt.Sprintf("app-%d", i%40), "tier": []string{"web", "api", "db"}[i%3]},
			fmt.Sprintf("node-%d", i%nodes), corev1.ContainerPort{Name: "http", ContainerPort: 8080})
		created, err := c.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		created.Status.Phase = corev1.PodRunning
		ip := fmt.Sprintf("10.%d.%d.%d", 100+i>>16, (i>>8)&255, i&255)
		created.Status.PodIP, created.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		_, err = c.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{})
		return err
	})
	t.Logf("created %d pods with IPs through the API server in %v", n, time.Since(start).Round(time.Millisecond))
	for i := range namespaces {
		ns := fmt.Sprintf("ns-%d", i)
		for _, tier := range []string{"web", "api", "db"} {
			np := &networkingv1.NetworkPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: tier},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": tier}},
					Ingress: []networkingv1.NetworkPolicyIngressRule{{
						From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "t1"}}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}}}},
						Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("http"))}},
					}},
				},
			}
			if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, np, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The rest: each isolates one app of its namespace for ingress from one team's pods on
	// one port. None selects the probe's pods (apps 0 and 6 are left out), so the probe's
	// verdicts stay those of the three tier policies.
	inParallel(t, ctx, nPolicies-3*namespaces, func(i int) error {
		app := 1 + i%38
		if app >= 6 {
			app++
		}
		np := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns-%d", i%namespaces), Name: fmt.Sprintf("extra-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", app)}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprintf("t%d", i%5)}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(int32(8000 + i%100)))}},
				}},
			},
		}
		_, err := c.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{})
		return err
	})

	// The churn the source will see, first without it: what the test process itself spends
	// making 100 changes per second is then taken off the figure measured with the source.
	churnCPU := func(what string) time.Duration {
		if churnFor == 0 {
			return 0
		}
		cpu0, t0 := processCPU(), time.Now()
		// The probe's API calls too, at about the rate the measured run makes them.
		probeCall := func(i int) {
			body := `{"metadata":{"labels":{"probe":"` + strconv.Itoa(i%2) + `"}}}`
			if _, err := c.CoreV1().Pods("ns-7").Patch(ctx, "pod-7", types.MergePatchType, []byte(body), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		made := churn(t, ctx, c, n, namespaces, churnFor, probeCall)
		cpu := processCPU() - cpu0
		t.Logf("churn %s: %d pod label changes in %v, test process CPU %v", what, made, time.Since(t0).Round(time.Millisecond), cpu.Round(time.Millisecond))
		return cpu
	}
	controlCPU := churnCPU("without the source (control)")

	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	cfg := *env.Config
	var received atomic.Int64
	var lists, watchLists atomic.Int64
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return &countingTransport{rt: rt, bytes: &received, lists: &lists, watchLists: &watchLists}
	})
	src := NewAPISource(&cfg, policy.Options{Node: "node-0"}, testLogger(t), 100*time.Millisecond)
	var f inForce
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	syncStart := time.Now()
	go func() { done <- src.Run(runCtx, f.publish) }()
	defer func() { stop(); <-done }()
	deadline := time.Now().Add(5 * time.Minute)
	for !src.Ready() {
		if time.Now().After(deadline) {
			t.Fatalf("not ready within 5 min with %d pods", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	syncTime := time.Since(syncStart)
	st := f.cur.Load().Stats()
	if st.Pods != n {
		t.Fatalf("snapshot has %d pods, want %d", st.Pods, n)
	}
	after := heap()
	runtime.KeepAlive(src)
	t.Logf("pods=%d policies=%d: list+first snapshot %v, %.1f MiB received (%d lists, %d streaming watch-lists); heap held by the source (informer caches + snapshot + builder) %.1f MiB (%.0f bytes/pod); snapshot %+v",
		n, nPolicies, syncTime.Round(time.Millisecond), float64(received.Load())/(1<<20), lists.Load(), watchLists.Load(),
		float64(after-before)/(1<<20), float64(after-before)/float64(n), st)

	// Probe: pod-6 (ns-6, team t1, tier web) -> pod-0 (ns-0, node-0, local, tier web) on http is
	// allowed by policy ns-0/web; relabelling pod-6 away from tier web denies it, and back.
	if n < 7 {
		t.Skip("too few pods for the propagation probe")
	}
	fl := tcp("10.100.0.6", "10.100.0.0", 8080)
	if v := f.cur.Load().Decide(fl); !v.Allowed || v.Reason != policy.ReasonRule {
		t.Fatalf("pod-6 -> pod-0:8080 before the changes: %v, want allowed by rule", v)
	}
	histBefore := histogram(metricPropagation.WithLabelValues("api").(prometheus.Metric))
	buildsBefore := histogram(metricCompile.WithLabelValues("api").(prometheus.Metric)).GetSampleCount()
	probe := func(i int, quiet bool) time.Duration {
		tier := []string{"api", "web"}[i%2]
		at := patch(t, ctx, func() error {
			_, err := c.CoreV1().Pods("ns-6").Patch(ctx, "pod-6", types.MergePatchType, mergePatch(`{"metadata":{"labels":{"tier":"`+tier+`"}}}`), metav1.PatchOptions{})
			return err
		})
		return f.waitDecisionQuiet(t, fmt.Sprintf("scale %d pods: pod-6 tier=%s", n, tier), at, fl, tier == "web", quiet)
	}
	// Idle: each change comes after the debounce window of the last build has passed.
	var props []time.Duration
	for i := range nChanges {
		props = append(props, probe(i, i >= 4))
		time.Sleep(150 * time.Millisecond)
	}
	t.Logf("pods=%d policies=%d: propagation (API call -> snapshot in force) of %d label changes, idle: %s (debounce 100ms, adaptive)",
		n, nPolicies, len(props), percentiles(props))

	// Under churn: 100 pod changes per second from another goroutine, the probe in between.
	if churnFor > 0 {
		var churnProps []time.Duration
		cpu0 := processCPU()
		built0 := histogram(metricCompile.WithLabelValues("api").(prometheus.Metric)).GetSampleSum()
		made := churn(t, ctx, c, n, namespaces, churnFor, func(i int) { churnProps = append(churnProps, probe(i, true)) })
		cpu := processCPU() - cpu0
		built := time.Duration((histogram(metricCompile.WithLabelValues("api").(prometheus.Metric)).GetSampleSum() - built0) * float64(time.Second))
		source := cpu - controlCPU
		t.Logf("pods=%d policies=%d: churn of %d pod label changes in %v: propagation of %d probe changes during it %s; test process CPU %v, %v more than the control: the source's CPU (informers and builds) is %.1f%% of one core, its builds alone took %v (%.1f%%)",
			n, nPolicies, made, churnFor, len(churnProps), percentiles(churnProps), cpu.Round(time.Millisecond), source.Round(time.Millisecond),
			100*source.Seconds()/churnFor.Seconds(), built.Round(time.Millisecond), 100*built.Seconds()/churnFor.Seconds())
		if got := f.cur.Load().Stats().Pods; got != n {
			t.Errorf("after the churn the snapshot has %d pods, want %d", got, n)
		}
	}
	if cs := histogram(metricCompile.WithLabelValues("api").(prometheus.Metric)); cs.GetSampleCount() > buildsBefore {
		t.Logf("builds since the first snapshot: %d (sluice_watch_builds_total: %s)", cs.GetSampleCount()-buildsBefore, buildKinds())
	}
	h := histogram(metricPropagation.WithLabelValues("api").(prometheus.Metric))
	if cnt := h.GetSampleCount() - histBefore.GetSampleCount(); cnt > 0 {
		t.Logf("pods=%d: sluice_watch_propagation_seconds (informer event -> published): %d samples, mean %v",
			n, cnt, time.Duration((h.GetSampleSum()-histBefore.GetSampleSum())/float64(cnt)*float64(time.Second)).Round(time.Millisecond))
	}
	cs := histogram(metricCompile.WithLabelValues("api").(prometheus.Metric))
	if cs.GetSampleCount() > 0 {
		t.Logf("sluice_watch_compile_seconds over this process: %d compiles, mean %v", cs.GetSampleCount(),
			time.Duration(cs.GetSampleSum()/float64(cs.GetSampleCount())*float64(time.Second)).Round(time.Microsecond))
	}
}

func histogram(m prometheus.Metric) *dto.Histogram {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		panic(err)
	}
	return out.Histogram
}

// inParallel runs do(0) to do(n-1), 16 at a time, and fails the test on the first error.
func inParallel(t *testing.T, ctx context.Context, n int, do func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	var next atomic.Int64
	errs := make(chan error, 1)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := do(i); err != nil {
					select {
					case errs <- err:
					default:
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

// churn changes the "churn" label of pods other than the probe's (pod-0, pod-6), 100 times per
// second for d, from 8 goroutines; between, when probe is set, it runs probe(i) for i = 0, 1...
// from the calling goroutine. It returns the number of changes made.
func churn(t *testing.T, ctx context.Context, c kubernetes.Interface, pods, namespaces int, d time.Duration, probe func(int)) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	ticks := make(chan int, 100)
	var wg sync.WaitGroup
	var made atomic.Int64
	var failed atomic.Value
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range ticks {
				i := 1 + (k*7919)%(pods-1)
				if i == 6 {
					i = 7 % pods
				}
				body := fmt.Sprintf(`{"metadata":{"labels":{"churn":"c%d"}}}`, k%3)
				_, err := c.CoreV1().Pods(fmt.Sprintf("ns-%d", i%namespaces)).Patch(context.Background(), fmt.Sprintf("pod-%d", i), types.MergePatchType, []byte(body), metav1.PatchOptions{})
				if err != nil {
					failed.Store(err)
					continue
				}
				made.Add(1)
			}
		}()
	}
	go func() {
		defer close(ticks)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for k := 0; ; k++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				select {
				case ticks <- k:
				default: // the API server is slower than 100/s: the count says so
				}
			}
		}
	}()
	if probe != nil {
		for i := 0; ctx.Err() == nil; i++ {
			probe(i)
			time.Sleep(50 * time.Millisecond)
		}
	}
	<-ctx.Done()
	wg.Wait()
	if err, ok := failed.Load().(error); ok {
		t.Fatalf("churn: %v", err)
	}
	return int(made.Load())
}

// percentiles summarises durations: p50, p99, max.
func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "no samples"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return fmt.Sprintf("p50 %v, p99 %v, max %v (n=%d)", at(0.5).Round(time.Millisecond), at(0.99).Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), len(s))
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// countingTransport counts the bytes of response bodies, the list requests and the watch
// requests that ask for the initial state as events (client-go's streaming watch-list).
type countingTransport struct {
	rt                http.RoundTripper
	bytes             *atomic.Int64
	lists, watchLists *atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	q := r.URL.Query()
	switch {
	case q.Get("watch") == "true" || q.Get("watch") == "1":
		if q.Get("sendInitialEvents") == "true" {
			c.watchLists.Add(1)
		}
	case r.Method == http.MethodGet:
		c.lists.Add(1)
	}
	resp, err := c.rt.RoundTrip(r)
	if err == nil && resp.Body != nil {
		resp.Body = &countingBody{ReadCloser: resp.Body, n: c.bytes}
	}
	return resp, err
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// buildKinds reads sluice_watch_builds_total of the API source.
func buildKinds() string {
	var out []string
	for _, kind := range []string{"patch", "compile"} {
		var m dto.Metric
		if err := metricBuilds.WithLabelValues("api", kind).(prometheus.Metric).Write(&m); err == nil {
			out = append(out, fmt.Sprintf("%s %.0f", kind, m.GetCounter().GetValue()))
		}
	}
	return strings.Join(out, ", ")
}
