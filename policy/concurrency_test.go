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

// TestBuilderConcurrent: packet workers go on reading a generation while the Builder patches
// the next ones from it (pages, shards and sets shared between them). Each generation must keep
// answering as it did when it was built; with -race, any write to memory an older generation
// reads is reported.
func TestBuilderConcurrent(t *testing.T) {
	st := clustergen.Generate(200, 3)
	flows := clustergen.Flows(st, 500, 4)
	b := builderOf(st, policy.Options{})
	snap, err := b.Build(1)
	if err != nil {
		t.Fatal(err)
	}
	type gen struct {
		snap *policy.Snapshot
		want []policy.Verdict
	}
	answers := func(s *policy.Snapshot) gen {
		g := gen{snap: s}
		for _, f := range flows {
			g.want = append(g.want, s.Decide(f))
		}
		return g
	}
	cur := make(chan gen, 1)
	cur <- answers(snap)
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	done := make(chan struct{})
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				g := <-cur
				cur <- g
				for i, f := range flows {
					if got := g.snap.Decide(f); got != g.want[i] {
						errs <- f.Src.String() + " -> " + f.Dst.String() + ": a generation's answer changed while later ones were built"
						return
					}
				}
			}
		}()
	}
	// Pod churn (relabels, deletions, re-adds) and policy replacements, patched one by one.
	for i := 0; i < 300; i++ {
		p := st.Pods[(i*7)%len(st.Pods)].DeepCopy()
		switch i % 4 {
		case 0:
			p.Labels = map[string]string{"app": "churn"}
			b.SetPod(p)
		case 1:
			b.DeletePod(p.Namespace, p.Name)
		case 2:
			b.SetPod(p)
		case 3:
			np := st.Policies[i%len(st.Policies)].DeepCopy()
			np.Spec.PodSelector.MatchLabels = map[string]string{"app": "churn"}
			b.SetPolicy(np)
		}
		s, err := b.Build(uint64(i + 2))
		if err != nil {
			t.Fatal(err)
		}
		g := answers(s)
		<-cur
		cur <- g
	}
	close(done)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if patched, _ := b.Builds(); patched < 250 {
		t.Errorf("only %d of 300 builds were patches", patched)
	}
}
