package policy_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"pgregory.net/rapid"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// The Builder's differential test: random clusters take random sequences of changes, mostly
// to pods (as a cluster's churn is), now and then to a policy or namespace; after every Build
// the snapshot is compared with the reference on the same objects (everything diffCheck
// compares), and the snapshot before it must still answer as it did (readers of an older
// generation never see a later change).

var builderSteps, builderPatched, unchangedVouched, unchangedChecked atomic.Int64

// `go test` runs 100 random sequences on small and 100 on large clusters; SLUICE_DIFF_FLOWS=N
// (the long mode of TestDifferential) goes on until N flows were checked.
func TestBuilderDifferential(t *testing.T) {
	builderSteps.Store(0)
	builderPatched.Store(0)
	unchangedVouched.Store(0)
	unchangedChecked.Store(0)
	flows0 := diffFlowsChecked.Load()
	var target int64
	if v := os.Getenv("SLUICE_DIFF_FLOWS"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("SLUICE_DIFF_FLOWS=%q: want a positive number of flows", v)
		}
		target = n
	}
	for first := true; first || (!t.Failed() && diffFlowsChecked.Load()-flows0 < target); first = false {
		for _, cfg := range []*diffConfig{diffSmall, diffLarge} {
			rapid.Check(t, func(rt *rapid.T) { builderProperty(rt, cfg) })
		}
	}
	steps, patched := builderSteps.Load(), builderPatched.Load()
	t.Logf("builder: %d builds after random changes checked against the reference (%d flows), %d of them patches",
		steps, diffFlowsChecked.Load()-flows0, patched)
	vouched, checked := unchangedVouched.Load(), unchangedChecked.Load()
	t.Logf("Unchanged vouched for %d of %d (flow, older snapshot) pairs (%.0f%%); each was held to the older verdict",
		vouched, checked, 100*float64(vouched)/float64(max(checked, 1)))
	// An Unchanged that never vouches would pass the check above and keep no cache warm.
	if !t.Failed() && vouched*5 < checked {
		t.Fatalf("Unchanged vouched for only %d of %d pairs", vouched, checked)
	}
	// Most steps change pods only; if they all compiled everything the patch path went untested.
	if !t.Failed() && patched*2 < steps {
		t.Fatalf("only %d of %d builds patched the last snapshot", patched, steps)
	}
}

// mirror is the test's own copy of the objects the Builder holds.
type mirror struct {
	pods map[policy.PodRef]corev1.Pod
	nss  map[string]corev1.Namespace
	pols map[policy.PodRef]networkingv1.NetworkPolicy
}

func (m *mirror) state() *policy.State {
	st := &policy.State{}
	byRef := policy.PodRef.Compare
	for _, k := range slices.Sorted(maps.Keys(m.nss)) {
		st.Namespaces = append(st.Namespaces, m.nss[k])
	}
	for _, k := range slices.SortedFunc(maps.Keys(m.pods), byRef) {
		st.Pods = append(st.Pods, m.pods[k])
	}
	for _, k := range slices.SortedFunc(maps.Keys(m.pols), byRef) {
		st.Policies = append(st.Policies, m.pols[k])
	}
	return st
}

func builderProperty(rt *rapid.T, cfg *diffConfig) {
	st := drawState(rt, cfg)
	opt := policy.Options{Node: rapid.SampledFrom([]string{"", "", "node-a", "node-b"}).Draw(rt, "node")}
	b := builderOf(st, opt)
	m := &mirror{pods: map[policy.PodRef]corev1.Pod{}, nss: map[string]corev1.Namespace{}, pols: map[policy.PodRef]networkingv1.NetworkPolicy{}}
	for _, ns := range st.Namespaces {
		m.nss[ns.Name] = ns
	}
	for _, p := range st.Pods {
		m.pods[policy.PodRef{Namespace: p.Namespace, Name: p.Name}] = p
	}
	for _, np := range st.Policies {
		m.pols[policy.PodRef{Namespace: np.Namespace, Name: np.Name}] = np
	}
	gen := uint64(1)
	snap, err := b.Build(gen)
	if err != nil {
		rt.Fatalf("Build: %v", err)
	}
	nextPod := cfg.maxPods
	nextPolicy := cfg.maxPolicies
	// The last snapshots, to hold Unchanged to what they answered.
	history := []*policy.Snapshot{snap}
	seed := rapid.Uint64().Draw(rt, "flowseed")
	flows := max(cfg.flowsPerCheck/5, 100)
	for step, n := 0, rapid.IntRange(1, 25).Draw(rt, "steps"); step < n; step++ {
		var log []string
		for range rapid.IntRange(1, 3).Draw(rt, "changes") {
			refs := slices.SortedFunc(maps.Keys(m.pods), policy.PodRef.Compare)
			op := rapid.IntRange(0, 23).Draw(rt, "op")
			switch {
			case op < 6 && len(refs) > 0: // a pod changes: labels, addresses, phase, ports, node
				ref := rapid.SampledFrom(refs).Draw(rt, "pod")
				p := drawPod(rt, cfg, 0)
				p.Namespace, p.Name = ref.Namespace, ref.Name
				m.pods[ref] = p
				b.SetPod(&p)
				log = append(log, "replace pod "+ref.String())
			case op < 10 && len(refs) > 0: // only its labels change
				ref := rapid.SampledFrom(refs).Draw(rt, "pod")
				old := m.pods[ref]
				p := *old.DeepCopy()
				p.Labels = drawLabels(rt, "relabel")
				m.pods[ref] = p
				b.SetPod(&p)
				log = append(log, "relabel pod "+ref.String())
			case op < 14: // a new pod
				p := drawPod(rt, cfg, nextPod)
				nextPod++
				ref := policy.PodRef{Namespace: p.Namespace, Name: p.Name}
				m.pods[ref] = p
				b.SetPod(&p)
				log = append(log, "add pod "+ref.String())
			case op < 18 && len(refs) > 0:
				ref := rapid.SampledFrom(refs).Draw(rt, "pod")
				delete(m.pods, ref)
				b.DeletePod(ref.Namespace, ref.Name)
				log = append(log, "delete pod "+ref.String())
			case op < 22: // a policy is added, replaced or deleted
				var podNS []string
				for _, r := range refs {
					podNS = append(podNS, r.Namespace)
				}
				pols := slices.SortedFunc(maps.Keys(m.pols), policy.PodRef.Compare)
				if len(pols) > 0 && rapid.Bool().Draw(rt, "np.delete") {
					ref := rapid.SampledFrom(pols).Draw(rt, "np")
					delete(m.pols, ref)
					b.DeletePolicy(ref.Namespace, ref.Name)
					log = append(log, "delete policy "+ref.String())
					break
				}
				np := drawPolicy(rt, cfg, nextPolicy, podNS)
				nextPolicy++
				ref := policy.PodRef{Namespace: np.Namespace, Name: np.Name}
				m.pols[ref] = np
				b.SetPolicy(&np)
				log = append(log, "add policy "+ref.String())
			default: // a namespace is deleted, or added or relabelled
				name := rapid.SampledFrom(diffNamespaces).Draw(rt, "ns")
				if rapid.IntRange(0, 2).Draw(rt, "ns.delete") == 0 {
					delete(m.nss, name)
					b.DeleteNamespace(name)
					log = append(log, "delete namespace "+name)
					break
				}
				ns := corev1.Namespace{}
				ns.Name, ns.Labels = name, drawLabels(rt, "ns.labels")
				m.nss[name] = ns
				b.SetNamespace(&ns)
				log = append(log, "label namespace "+name)
			}
		}
		// What the previous generation answers now, to hold it to it after the next Build.
		prev := snap
		r := rand.New(rand.NewPCG(seed, uint64(step)))
		prevSt := m.state()
		probe := clustergenFlows(r, prevSt, 64)
		var before []policy.Verdict
		var beforeEx []policy.Explanation
		for _, f := range probe {
			before = append(before, prev.Decide(f))
			beforeEx = append(beforeEx, prev.Explain(f))
		}
		beforePods, beforeLocal := prev.Pods(), prev.LocalPodIPs()

		gen++
		patchedBefore, _ := b.Builds()
		snap, err = b.Build(gen)
		if err != nil {
			rt.Fatalf("step %d (%v): Build: %v", step, log, err)
		}
		if patched, _ := b.Builds(); patched > patchedBefore {
			builderPatched.Add(1)
		}
		builderSteps.Add(1)
		if snap.Generation() != gen {
			rt.Fatalf("step %d: Generation() = %d, want %d", step, snap.Generation(), gen)
		}
		st := m.state()
		if got, want := len(b.State().Pods), len(st.Pods); got != want {
			rt.Fatalf("step %d (%v): Builder.State has %d pods, want %d", step, log, got, want)
		}
		rt.Logf("step %d: %v", step, log)
		diffCheck(rt, st, opt, snap, seed+uint64(step), flows)
		for i, f := range probe {
			if got := prev.Decide(f); got != before[i] {
				rt.Fatalf("step %d (%v): the previous generation's verdict on %s -> %s %d/%s changed from %v to %v",
					step, log, f.Src, f.Dst, f.Port, f.Proto, before[i], got)
			}
			if got := prev.Explain(f); !reflect.DeepEqual(got, beforeEx[i]) {
				rt.Fatalf("step %d (%v): the previous generation's explanation of %s -> %s %d/%s changed from\n%+v\nto\n%+v",
					step, log, f.Src, f.Dst, f.Port, f.Proto, beforeEx[i], got)
			}
		}
		if got := prev.Pods(); !slices.Equal(got, beforePods) {
			rt.Fatalf("step %d (%v): the previous generation's Pods() changed from %v to %v", step, log, beforePods, got)
		}
		if got := prev.LocalPodIPs(); !slices.Equal(got, beforeLocal) {
			rt.Fatalf("step %d (%v): the previous generation's LocalPodIPs() changed from %v to %v", step, log, beforeLocal, got)
		}
		checkUnchanged(rt, step, log, snap, history, append(probe, clustergenFlows(r, st, 64)...))
		history = append(history[max(0, len(history)-7):], snap)
	}
}

// checkUnchanged holds snap's Unchanged and ChangedSince to the verdicts of the older snapshots
// in history: a flow snap vouches for has the verdict it had there.
func checkUnchanged(rt *rapid.T, step int, log []string, snap *policy.Snapshot, history []*policy.Snapshot, flows []policy.Flow) {
	for _, h := range history {
		changed, known := snap.ChangedSince(h.Serial())
		for _, f := range flows {
			same := snap.Unchanged(f, h.Serial())
			unchangedChecked.Add(1)
			if same {
				unchangedVouched.Add(1)
				if got, was := snap.Decide(f), h.Decide(f); got != was {
					rt.Fatalf("step %d (%v): %s -> %s %d/%s is vouched for since generation %d, but its verdict changed from %v to %v",
						step, log, f.Src, f.Dst, f.Port, f.Proto, h.Generation(), was, got)
				}
			}
			if known {
				listed := slices.Contains(changed, f.Src) || slices.Contains(changed, f.Dst)
				if listed == same {
					rt.Fatalf("step %d (%v): %s -> %s: Unchanged since generation %d says %v, but ChangedSince lists an end: %v",
						step, log, f.Src, f.Dst, h.Generation(), same, listed)
				}
			} else if same {
				rt.Fatalf("step %d (%v): Unchanged vouches for %s -> %s since generation %d, which ChangedSince does not know", step, log, f.Src, f.Dst, h.Generation())
			}
		}
	}
}

// clustergenFlows draws n flows between the state's pod addresses (and one outside address).
func clustergenFlows(r *rand.Rand, st *policy.State, n int) []policy.Flow {
	addrs := diffAddrs(st)
	ports := diffPorts(st)
	var out []policy.Flow
	for range n {
		out = append(out, diffFlow(r, addrs, addrs, ports))
	}
	return out
}

// BenchmarkChange measures one change applied to a live snapshot of the generated cluster of
// BenchmarkCompile/policies=N (so the two compare line by line): a pod's labels (the change a
// cluster makes most; alternately to another app and back, so every op does the same work), and
// a policy replaced by a copy whose pod selector picks another app.
func BenchmarkChange(b *testing.B) {
	for _, kind := range []string{"pod", "policy"} {
		for _, n := range []int{1000, 10000} {
			b.Run(fmt.Sprintf("%s/policies=%d", kind, n), func(b *testing.B) {
				c := benchClusterFor(b, n)
				bl := builderOf(c.st, policy.Options{})
				gen := uint64(1)
				if _, err := bl.Build(gen); err != nil {
					b.Fatal(err)
				}
				var change [2]func()
				switch kind {
				case "pod":
					p := c.st.Pods[len(c.st.Pods)/2]
					other := *p.DeepCopy()
					other.Labels = maps.Clone(p.Labels)
					other.Labels["app"] = other.Labels["app"] + "-moved"
					change = [2]func(){func() { bl.SetPod(&other) }, func() { bl.SetPod(&p) }}
				case "policy":
					np := c.st.Policies[len(c.st.Policies)/2]
					other := *np.DeepCopy()
					other.Spec.PodSelector.MatchLabels = map[string]string{"app": "moved"}
					change = [2]func(){func() { bl.SetPolicy(&other) }, func() { bl.SetPolicy(&np) }}
				}
				b.ReportAllocs()
				cpu := startCPU()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					change[i&1]()
					gen++
					if _, err := bl.Build(gen); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				cpu.report(b)
				patched, compiled := bl.Builds()
				b.ReportMetric(float64(patched)/float64(patched+compiled), "patched/build")
			})
		}
	}
}

// TestBuilderNamespaceThenPolicy: a namespace's labels change, then policies arrive with peer
// selectors no earlier policy used, resolved against the namespaces as they are now; then the
// namespace goes and comes back.
func TestBuilderNamespaceThenPolicy(t *testing.T) {
	ns := func(name string, l map[string]string) *corev1.Namespace {
		o := &corev1.Namespace{}
		o.Name, o.Labels = name, l
		return o
	}
	pod := func(ns, name, ip string, l map[string]string) *corev1.Pod {
		p := &corev1.Pod{}
		p.Namespace, p.Name, p.Labels = ns, name, l
		p.Status.Phase, p.Status.PodIP = corev1.PodRunning, ip
		return p
	}
	from := func(name, team string) *networkingv1.NetworkPolicy {
		np := &networkingv1.NetworkPolicy{}
		np.Namespace, np.Name = "a", name
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": team}},
		}}}}
		return np
	}
	b := policy.NewBuilder(policy.Options{})
	b.SetNamespace(ns("a", map[string]string{"team": "x"}))
	b.SetNamespace(ns("b", map[string]string{"team": "y"}))
	b.SetPod(pod("a", "server", "10.0.0.1", nil))
	b.SetPod(pod("b", "client", "10.0.0.2", map[string]string{"role": "client"}))
	b.SetPolicy(from("from-y", "y"))
	fl := policy.Flow{Src: netip.MustParseAddr("10.0.0.2"), Dst: netip.MustParseAddr("10.0.0.1"), Proto: policy.TCP, Port: 80}
	gen := uint64(0)
	step := func(what string, want bool) {
		t.Helper()
		gen++
		s, err := b.Build(gen)
		if err != nil {
			t.Fatal(err)
		}
		fresh, err := policy.Compile(b.State(), policy.Options{})
		if err != nil {
			t.Fatal(err)
		}
		got, ref := s.Decide(fl), fresh.Decide(fl)
		if got != ref || got.Allowed != want {
			t.Fatalf("%s: b/client -> a/server = %v, a fresh compile says %v, want allowed=%v", what, got, ref, want)
		}
	}
	step("namespace b is team y", true)
	b.SetNamespace(ns("b", map[string]string{"team": "z"}))
	step("namespace b is team z now", false)
	// The namespace selector team=y again, with a pod selector: a new peer set, whose
	// namespaces must not come from a selection made before the relabelling.
	yClients := from("from-y-clients", "y")
	yClients.Spec.Ingress[0].From[0].PodSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}
	b.SetPolicy(yClients)
	step("a policy admits team y's clients", false)
	b.SetPolicy(from("from-z", "z"))
	step("a policy admits team z", true)
	b.DeleteNamespace("b")
	step("namespace b deleted (its pod named only)", false)
	b.SetNamespace(ns("b", map[string]string{"team": "z"}))
	step("namespace b back as team z", true)
	if patched, compiled := b.Builds(); compiled != 1 {
		t.Errorf("%d builds patched, %d compiled everything; want only the first to compile", patched, compiled)
	}
}

// TestBuilderNewPortName: a policy naming a port no policy named before is patched in, and the
// name resolves against every pod with such a port, the egress destinations it does not select
// included.
func TestBuilderNewPortName(t *testing.T) {
	pod := func(name, ip string, l map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
		p := &corev1.Pod{}
		p.Namespace, p.Name, p.Labels = "a", name, l
		p.Spec.Containers = []corev1.Container{{Name: "c", Ports: ports}}
		p.Status.Phase, p.Status.PodIP = corev1.PodRunning, ip
		return p
	}
	b := policy.NewBuilder(policy.Options{})
	b.SetNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "a"}})
	b.SetPod(pod("client", "10.0.0.1", map[string]string{"app": "client"}))
	b.SetPod(pod("exporter", "10.0.0.2", map[string]string{"app": "exporter"}, corev1.ContainerPort{Name: "metrics", ContainerPort: 9100}))
	before, err := b.Build(1)
	if err != nil {
		t.Fatal(err)
	}
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "scrape"}}
	np.Spec.PodSelector.MatchLabels = map[string]string{"app": "client"}
	np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	metrics := intstr.FromString("metrics")
	np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &metrics}}}}
	b.SetPolicy(np)
	s, err := b.Build(2)
	if err != nil {
		t.Fatal(err)
	}
	if patched, _ := b.Builds(); patched != 1 {
		t.Fatalf("the new port name compiled everything (%d patches)", patched)
	}
	fresh, err := policy.Compile(b.State(), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr
	for _, f := range []policy.Flow{
		{Src: ip("10.0.0.1"), Dst: ip("10.0.0.2"), Proto: policy.TCP, Port: 9100},
		{Src: ip("10.0.0.1"), Dst: ip("10.0.0.2"), Proto: policy.TCP, Port: 9101},
		{Src: ip("10.0.0.2"), Dst: ip("10.0.0.1"), Proto: policy.TCP, Port: 9100},
	} {
		if got, want := s.Decide(f), fresh.Decide(f); got != want {
			t.Errorf("%s -> %s:%d: the patch says %v, a fresh compile %v", f.Src, f.Dst, f.Port, got, want)
		}
		if s.Unchanged(f, before.Serial()) && s.Decide(f) != before.Decide(f) {
			t.Errorf("%s -> %s:%d: vouched for, but the verdict changed", f.Src, f.Dst, f.Port)
		}
	}
	if v := s.Decide(policy.Flow{Src: ip("10.0.0.1"), Dst: ip("10.0.0.2"), Proto: policy.TCP, Port: 9100}); !v.Allowed {
		t.Errorf("client -> exporter:metrics is %v, want allowed", v)
	}
}

// TestBuilderBoundsLeftovers: a steady churn of relabels leaves no dead pod, but every patch
// appends the pod's named ports again; the Builder must compile everything now and then
// instead of growing without end.
func TestBuilderBoundsLeftovers(t *testing.T) {
	st := clustergen.Generate(20, 5)
	b := builderOf(st, policy.Options{})
	if _, err := b.Build(1); err != nil {
		t.Fatal(err)
	}
	p := st.Pods[0].DeepCopy()
	for i := range 20000 {
		p = p.DeepCopy()
		p.Labels = maps.Clone(p.Labels)
		p.Labels["churn"] = strconv.Itoa(i % 2)
		b.SetPod(p)
		if _, err := b.Build(uint64(i + 2)); err != nil {
			t.Fatal(err)
		}
	}
	patched, compiled := b.Builds()
	if compiled < 2 {
		t.Fatalf("20000 relabels: %d patches, %d full compiles; the leftovers were never dropped", patched, compiled)
	}
	if patched < 19000 {
		t.Errorf("20000 relabels: only %d patches (%d full compiles)", patched, compiled)
	}
	t.Logf("20000 relabels: %d patches, %d full compiles", patched, compiled)
}

// builderOf returns a Builder holding st's objects, not built yet.
func builderOf(st *policy.State, opt policy.Options) *policy.Builder {
	b := policy.NewBuilder(opt)
	for i := range st.Namespaces {
		b.SetNamespace(&st.Namespaces[i])
	}
	for i := range st.Pods {
		b.SetPod(&st.Pods[i])
	}
	for i := range st.Policies {
		b.SetPolicy(&st.Policies[i])
	}
	return b
}

// TestBuilderInvalidPolicies: with Options.IsolateInvalid, a policy that stops or starts
// compiling is patched in, and each build answers, counts and reports its broken policies as a
// fresh Compile does.
func TestBuilderInvalidPolicies(t *testing.T) {
	opt := policy.Options{IsolateInvalid: true}
	b := policy.NewBuilder(opt)
	b.SetNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "a"}})
	addrs := []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}
	for i, app := range []string{"x", "y", "client"} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: app, Labels: map[string]string{"app": app}}}
		p.Status.Phase, p.Status.PodIP = corev1.PodRunning, addrs[i]
		b.SetPod(p)
	}
	port := intstr.FromInt32(80)
	allowX := func(types ...networkingv1.PolicyType) *networkingv1.NetworkPolicy {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "allow-x"}}
		np.Spec.PodSelector.MatchLabels = map[string]string{"app": "x"}
		np.Spec.PolicyTypes = types
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
			Ports: []networkingv1.NetworkPolicyPort{{Port: &port}},
		}}
		return np
	}
	brokenY := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "broken-y"}}
	brokenY.Spec.PodSelector.MatchExpressions = []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Bogus", Values: []string{"y"}}}

	gen := uint64(0)
	step := func(what string, invalid int) {
		t.Helper()
		gen++
		patchedBefore, _ := b.Builds()
		s, err := b.Build(gen)
		fresh, freshErr := policy.Compile(b.State(), opt)
		if s == nil || fresh == nil {
			t.Fatalf("%s: no snapshot (build %v, compile %v)", what, err, freshErr)
		}
		if patched, _ := b.Builds(); gen > 1 && patched == patchedBefore {
			t.Errorf("%s: compiled everything, want a patch", what)
		}
		if fmt.Sprint(err) != fmt.Sprint(freshErr) {
			t.Errorf("%s: Build reports %v, Compile %v", what, err, freshErr)
		}
		if got, want := s.Stats(), fresh.Stats(); got.Invalid != want.Invalid || got.Invalid != invalid || got.Policies != want.Policies || got.Rules != want.Rules {
			t.Errorf("%s: stats %+v, Compile's %+v, want %d invalid", what, got, want, invalid)
		}
		for _, src := range addrs {
			for _, dst := range addrs {
				for _, p := range []uint16{80, 443} {
					f := policy.Flow{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: policy.TCP, Port: p}
					if got, want := s.Decide(f), fresh.Decide(f); got != want {
						t.Errorf("%s: %s -> %s:%d: the patch says %v, Compile %v", what, src, dst, p, got, want)
					}
				}
			}
		}
	}
	b.SetPolicy(allowX())
	step("x takes port 80 from the client", 0)
	b.SetPolicy(allowX("Bogus"))
	step("allow-x has a policy type that does not exist: x isolated both ways, no rules", 1)
	b.SetPolicy(brokenY)
	step("broken-y's selector does not parse: every pod of a isolated", 2)
	b.SetPolicy(allowX())
	step("allow-x fixed", 1)
	b.DeletePolicy("a", "broken-y")
	step("broken-y deleted", 0)
}
