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
