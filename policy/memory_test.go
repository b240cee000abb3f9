package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// maxRequestBytes is the largest object the API server stores: etcd's default request limit
// (--max-request-bytes, 1.5 MiB).
const maxRequestBytes = 3 << 19

// tenantPods returns n pods of namespace tenant on node, each with a few named ports.
func tenantPods(n int, node string) []corev1.Pod {
	out := make([]corev1.Pod, n)
	for i := range out {
		p := pod("tenant", fmt.Sprintf("p%03d", i), node, map[string]string{"app": "x"}, netip.AddrFrom4([4]byte{10, 9, byte(i / 250), byte(1 + i%250)}).String())
		p.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{
			{Name: "p1", ContainerPort: 8001, Protocol: corev1.ProtocolTCP},
			{Name: "p2", ContainerPort: 8002, Protocol: corev1.ProtocolTCP},
			{Name: "unused", ContainerPort: 8003, Protocol: corev1.ProtocolTCP},
		}}}
		out[i] = p
	}
	return out
}

// worstInBounds is a policy at every bound at once, built to cost the most: MaxRules rules,
// MaxPorts ports (every tenth a distinct named port), MaxPeers peers of which
// MaxSelectorPeers have distinct selectors matching every pod (each a pod set of its own), one
// is ::/0 with MaxExcepts scattered /128 holes (about 120 prefixes each), and the rest are
// distinct /32 blocks.
func worstInBounds() networkingv1.NetworkPolicy {
	np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "tenant", Name: "worst"}}
	np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
	tcp := corev1.ProtocolTCP
	portsPer, peersPer := MaxPorts/MaxRules, MaxPeers/MaxRules
	var nPort, nPeer, nSel int
	for r := 0; r < MaxRules; r++ {
		var ports []networkingv1.NetworkPolicyPort
		for k := 0; k < portsPer; k++ {
			p := intstr.FromInt32(int32(1 + nPort%65000))
			if nPort%10 == 0 {
				p = intstr.FromString(fmt.Sprintf("n%d", nPort))
			}
			ports = append(ports, networkingv1.NetworkPolicyPort{Protocol: &tcp, Port: &p})
			nPort++
		}
		var peers []networkingv1.NetworkPolicyPeer
		for k := 0; k < peersPer; k++ {
			switch {
			case nPeer == 0:
				peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: "::/0", Except: scatteredHoles(MaxExcepts)}})
			case nSel < MaxSelectorPeers:
				peers = append(peers, networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "app", Operator: metav1.LabelSelectorOpNotIn, Values: []string{fmt.Sprintf("v%d", nSel)}}}}})
				nSel++
			default:
				a := netip.AddrFrom4([4]byte{100, byte(nPeer >> 16), byte(nPeer >> 8), byte(nPeer)})
				peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: netip.PrefixFrom(a, 32).String()}})
			}
			nPeer++
		}
		if r%2 == 0 {
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers, Ports: ports})
		} else {
			np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: peers, Ports: ports})
		}
	}
	return np
}

// scatteredHoles returns n random /128 prefixes: as excepts of ::/0, each splits the block into
// about 128 prefixes, the most an except can cost.
func scatteredHoles(n int) []string {
	r := rand.New(rand.NewPCG(1, 2))
	out := make([]string, n)
	for i := range out {
		var b [16]byte
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		b[0] = 0x20 // global unicast, never a pod address here
		out[i] = netip.PrefixFrom(netip.AddrFrom16(b), 128).String()
	}
	return out
}

// Objects about as large as the API server stores (checked): ports are what the issue found
// costing every node per pod; excepts make the compiled ipBlock grow fastest.
func largestByPorts() networkingv1.NetworkPolicy {
	np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "tenant", Name: "ports"}}
	var ports []networkingv1.NetworkPolicyPort
	for i := 0; i < 100_000; i++ { // written without protocol (TCP by default) to fit more
		p := intstr.FromInt32(int32(10000 + i%50000))
		ports = append(ports, networkingv1.NetworkPolicyPort{Port: &p})
	}
	np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: ports}}
	return np
}

func largestByExcepts(n int) networkingv1.NetworkPolicy {
	np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "tenant", Name: "excepts"}}
	np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
		{IPBlock: &networkingv1.IPBlock{CIDR: "::/0", Except: scatteredHoles(n)}}}}}
	return np
}

func jsonSize(t *testing.T, np *networkingv1.NetworkPolicy) int {
	b, err := json.Marshal(np)
	if err != nil {
		t.Fatal(err)
	}
	return len(b)
}

// retained compiles st for node n1 and returns the heap the snapshot holds after a GC (st is
// live on both sides of the measurement, so it does not count) and the bytes allocated while
// compiling.
func retained(st *State, bounded bool) (snap *Snapshot, err error, held, allocated uint64) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	snap, err = compile(st, Options{Node: "n1", IsolateInvalid: true}, bounded)
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(st)
	if after.HeapAlloc > before.HeapAlloc {
		held = after.HeapAlloc - before.HeapAlloc
	}
	return snap, err, held, after.TotalAlloc - before.TotalAlloc
}

// TestPolicySizeBoundsMemory: one tenant's policy must not exhaust every agent's memory.
//   - The worst policy within the bounds retains at most maxRetained with 100 local and with
//     100 remote pods, and at most perPod more per pod than with one pod: what a policy costs
//     follows its size, not the pods it selects.
//   - The largest objects the API server stores are beyond the bounds: rejected with a
//     PolicyError naming the field, their pods stay isolated, and they retain next to nothing.
//   - Control: the except-heavy object compiled without the bounds retains and allocates what
//     would take a node down (at its full 30,000 excepts: 50 MiB kept, 880 MiB allocated and
//     7 s of CPU per compile, on every node); the control uses a third of it to stay quick.
func TestPolicySizeBoundsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds policies of megabytes")
	}
	const (
		maxRetained = 16 << 20 // the DaemonSet's limit is 512 MiB; a recompile holds two snapshots
		perPod      = 1 << 10
		maxRejected = 1 << 20
	)
	worst := worstInBounds()
	ports, excepts := largestByPorts(), largestByExcepts(30_000)
	for _, np := range []*networkingv1.NetworkPolicy{&worst, &ports, &excepts} {
		n := jsonSize(t, np)
		if n > maxRequestBytes {
			t.Fatalf("%s is %d bytes of JSON, more than the API server stores (%d)", np.Name, n, maxRequestBytes)
		}
		t.Logf("%s: %d bytes of JSON", np.Name, n)
	}
	for _, node := range []string{"n1", "n2"} {
		where := map[string]string{"n1": "local", "n2": "remote"}[node]
		one := &State{Pods: tenantPods(1, node), Policies: []networkingv1.NetworkPolicy{worst}}
		_, err, heldOne, _ := retained(one, true)
		if err != nil {
			t.Fatalf("the worst in-bounds policy does not compile: %v", err)
		}
		st := &State{Pods: tenantPods(100, node), Policies: []networkingv1.NetworkPolicy{worst}}
		snap, err, held, alloc := retained(st, true)
		if err != nil {
			t.Fatalf("the worst in-bounds policy does not compile: %v", err)
		}
		t.Logf("worst in-bounds policy, 100 %s pods: %.2f MiB retained (1 pod: %.2f MiB), %.1f MiB allocated while compiling",
			where, mib(held), mib(heldOne), mib(alloc))
		if held > maxRetained {
			t.Errorf("100 %s pods: the worst in-bounds policy retains %.1f MiB, bound %.0f MiB", where, mib(held), mib(maxRetained))
		}
		if held > heldOne && held-heldOne > 99*perPod {
			t.Errorf("%s pods: the worst in-bounds policy costs %.0f bytes per pod selected, bound %d", where, float64(held-heldOne)/99, perPod)
		}
		runtime.KeepAlive(snap)

		for _, np := range []networkingv1.NetworkPolicy{ports, excepts} {
			st := &State{Pods: tenantPods(100, node), Policies: []networkingv1.NetworkPolicy{np}}
			snap, err, held, alloc := retained(st, true)
			var ce *CompileError
			if snap == nil || !errors.As(err, &ce) || len(ce.Policies) != 1 || !strings.HasPrefix(ce.Policies[0].Field, "spec.ingress[0].") {
				t.Fatalf("100 %s pods: %s compiled to %v, %v; want it isolated with a PolicyError in spec.ingress[0]", where, np.Name, snap, err)
			}
			t.Logf("%s, 100 %s pods: rejected at %s (%v); %.2f MiB retained, %.2f MiB allocated", np.Name, where, ce.Policies[0].Field, ce.Policies[0].Err, mib(held), mib(alloc))
			if held > maxRejected || alloc > 8*maxRejected {
				t.Errorf("100 %s pods: the rejected %s retains %.2f MiB and allocates %.2f MiB, bounds %.0f and %.0f MiB",
					where, np.Name, mib(held), mib(alloc), mib(maxRejected), mib(8*maxRejected))
			}
			v := snap.Decide(Flow{Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("10.9.0.1"), Proto: TCP, Port: 10000})
			if want := node == "n2"; v.Allowed != want {
				t.Errorf("100 %s pods: a pod the rejected %s selects: %+v, want allowed=%v (isolated when local)", where, np.Name, v, want)
			}
			runtime.KeepAlive(snap)
		}
	}

	control := &State{Pods: tenantPods(100, "n1"), Policies: []networkingv1.NetworkPolicy{largestByExcepts(10_000)}}
	snap, err, held, alloc := retained(control, false)
	if err != nil {
		t.Fatalf("control: %v", err)
	}
	t.Logf("control: 10,000 excepts without bounds: %.1f MiB retained, %.0f MiB allocated", mib(held), mib(alloc))
	if held < maxRetained/2 || alloc < 256<<20 {
		t.Errorf("control: the unbounded object retains only %.1f MiB and allocates %.0f MiB; the test would not notice missing bounds", mib(held), mib(alloc))
	}
	runtime.KeepAlive(snap)
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// TestPolicySetsMemory: pods selected by different subsets of a namespace's policies do not
// each get a copy of those policies' ports. Twenty policies of 1,000 ports; pod i is selected
// by all but policy i%20 (labels a tenant controls). Laid out per pod, that would be 19,000
// entries (300 kB) per pod.
func TestPolicySetsMemory(t *testing.T) {
	const policies, perPod = 20, 4 << 10
	var pols []networkingv1.NetworkPolicy
	for k := 0; k < policies; k++ {
		var ports []networkingv1.NetworkPolicyPort
		for i := 0; i < 1000; i++ {
			p := intstr.FromInt32(int32(1 + k*1000 + i))
			ports = append(ports, networkingv1.NetworkPolicyPort{Port: &p})
		}
		pols = append(pols, networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "tenant", Name: fmt.Sprintf("p%d", k)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "skip", Operator: metav1.LabelSelectorOpNotIn, Values: []string{fmt.Sprint(k)}}}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports}},
			},
		})
	}
	held := func(n int) uint64 {
		pods := tenantPods(n, "n1")
		for i := range pods {
			pods[i].Labels = map[string]string{"skip": fmt.Sprint(i % policies)}
		}
		_, err, h, _ := retained(&State{Pods: pods, Policies: pols}, true)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	one, many := held(1), held(100)
	t.Logf("20 policies of 1,000 ports: 1 pod %.2f MiB, 100 pods in 20 distinct policy sets %.2f MiB", mib(one), mib(many))
	if many > one && many-one > 99*perPod {
		t.Errorf("%.0f bytes per pod, bound %d", float64(many-one)/99, perPod)
	}
}
