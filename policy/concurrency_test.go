package policy_test

import (
	"sync"
	"testing"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// TestDecideConcurrent: one snapshot serves every packet worker at once. Run with -race to catch
// hidden shared state; without it the test still checks that answers do not depend on
// interleaving.
func TestDecideConcurrent(t *testing.T) {
	st := clustergen.Generate(200, 3)
	flows := clustergen.Flows(st, 2000, 4)
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]policy.Verdict, len(flows))
	for i, f := range flows {
		want[i] = snap.Decide(f)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for k := range flows {
				i := (k + w*len(flows)/4) % len(flows)
				if got := snap.Decide(flows[i]); got != want[i] {
					errs <- flows[i].Src.String() + " -> " + flows[i].Dst.String() + ": concurrent Decide differs"
					return
				}
				if w == 0 && k%50 == 0 {
					_ = snap.Explain(flows[i])
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
