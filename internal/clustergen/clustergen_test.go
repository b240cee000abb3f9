package clustergen

import (
	"reflect"
	"testing"

	"github.com/sluice-dev/sluice/policy"
)

func TestGenerateDeterministicAndValid(t *testing.T) {
	a, b := Generate(200, 7), Generate(200, 7)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("Generate(200, 7) differs between calls; benchmarks could not be compared")
	}
	if reflect.DeepEqual(a, Generate(200, 8)) {
		t.Fatal("the seed changes nothing")
	}
	pods, nss := Sizes(200)
	if len(a.Pods) != pods || len(a.Namespaces) != nss+1 || len(a.Policies) != 200 {
		t.Fatalf("got %d pods, %d namespaces, %d policies; want %d, %d (+kube-system), 200",
			len(a.Pods), len(a.Namespaces), len(a.Policies), pods, nss)
	}
	policy.Default(a)
	if err := policy.Validate(a); err != nil {
		t.Fatalf("generated state is not what an API server would accept: %v", err)
	}
}

func TestSizesCap(t *testing.T) {
	if p, ns := Sizes(10000); p != MaxPods || ns != 1001 {
		t.Fatalf("Sizes(10000) = %d pods, %d namespaces; want %d, 1001", p, ns, MaxPods)
	}
}

func TestFlows(t *testing.T) {
	st := Generate(100, 1)
	f1, f2 := Flows(st, 5000, 3), Flows(st, 5000, 3)
	if len(f1) != 5000 || !reflect.DeepEqual(f1, f2) {
		t.Fatalf("Flows: %d flows, deterministic=%v", len(f1), reflect.DeepEqual(f1, f2))
	}
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var podToPod, fromOutside, toOutside, v6 int
	for _, f := range f1 {
		if f.Src.Is4() != f.Dst.Is4() {
			t.Fatalf("flow %v mixes families", f)
		}
		_, s := snap.Pod(f.Src)
		_, d := snap.Pod(f.Dst)
		switch {
		case s && d:
			podToPod++
		case d:
			fromOutside++
		case s:
			toOutside++
		}
		if f.Src.Is6() {
			v6++
		}
	}
	t.Logf("pod->pod %d, outside->pod %d, pod->outside %d, IPv6 %d", podToPod, fromOutside, toOutside, v6)
	for name, n := range map[string]int{"pod->pod": podToPod, "outside->pod": fromOutside, "pod->outside": toOutside, "IPv6": v6} {
		if n < len(f1)/20 {
			t.Errorf("only %d %s flows of %d", n, name, len(f1))
		}
	}
}
