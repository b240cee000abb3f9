package policy_test

import (
	"testing"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// TestDecideZeroAlloc: the packet path must not allocate, whatever the flow (pod or outside
// address, either family, isolated or not, judged on one side or both).
func TestDecideZeroAlloc(t *testing.T) {
	st := clustergen.Generate(1000, 1)
	flows := clustergen.Flows(st, 2000, 2)
	for _, node := range []string{"", "node-3"} {
		snap, err := policy.Compile(st, policy.Options{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		var allowed, denied int
		for _, f := range flows {
			if snap.Decide(f).Allowed {
				allowed++
			} else {
				denied++
			}
		}
		if allowed == 0 || denied == 0 {
			t.Fatalf("node %q: flow mix is one-sided (%d allowed, %d denied); the test would prove little", node, allowed, denied)
		}
		i := 0
		allocs := testing.AllocsPerRun(20000, func() {
			snap.Decide(flows[i%len(flows)])
			i++
		})
		if allocs != 0 {
			t.Errorf("node %q: Decide allocates %.2f times per call, want 0", node, allocs)
		}
	}
}

// TestUnchangedZeroAlloc: caches ask Unchanged on the packet path, across the longest log a
// snapshot keeps.
func TestUnchangedZeroAlloc(t *testing.T) {
	st := clustergen.Generate(1000, 1)
	flows := clustergen.Flows(st, 2000, 2)
	b := builderOf(st, policy.Options{})
	first, err := b.Build(1)
	if err != nil {
		t.Fatal(err)
	}
	snap := first
	for i := range 63 {
		p := *st.Pods[i].DeepCopy()
		p.Labels = map[string]string{"moved": "yes"}
		b.SetPod(&p)
		if snap, err = b.Build(uint64(i + 2)); err != nil {
			t.Fatal(err)
		}
	}
	vouched := 0
	for _, f := range flows {
		if snap.Unchanged(f, first.Serial()) {
			vouched++
		}
	}
	if vouched == 0 || vouched == len(flows) {
		t.Fatalf("Unchanged vouched for %d of %d flows after 63 pod changes; the test would prove little", vouched, len(flows))
	}
	i := 0
	allocs := testing.AllocsPerRun(20000, func() {
		snap.Unchanged(flows[i%len(flows)], first.Serial())
		i++
	})
	if allocs != 0 {
		t.Errorf("Unchanged allocates %.2f times per call, want 0", allocs)
	}
}
