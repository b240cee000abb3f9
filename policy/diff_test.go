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
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"pgregory.net/rapid"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// Differential test: random clusters and random policies exercising every feature of
// networking.k8s.io/v1, compiled with a random node, and Decide / Explain / Pod / IsLocal
// compared with the literal reference on many flows each. The vocabularies below are tiny on
// purpose, so that selectors, IPs, ipBlocks, named ports and port ranges collide often.
//
// `go test` checks at least diffDefaultFlows flows; SLUICE_DIFF_FLOWS=N checks at least N.

const (
	diffDefaultFlows  = 150_000
	diffFlowsPerCheck = 1500
)

var (
	diffNamespaces = []string{"alpha", "beta", "gamma", "delta"}
	diffNodes      = []string{"node-a", "node-b"}
	diffLabelKeys  = []string{"app", "tier", "env"}
	diffLabelVals  = []string{"x", "y", "z"}
	diffPortNames  = []string{"http", "dns", "metrics", "nope"}
	diffPortNums   = []int32{53, 80, 81, 8080, 8085}
	diffProtos     = []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}
	// Pod addresses are drawn from small pools so that ipBlocks cover some of them and two pods
	// sometimes claim the same address.
	diffSmall = &diffConfig{
		minPods: 1, maxPods: 8, maxPolicies: 6, flowsPerCheck: diffFlowsPerCheck,
		podV4: []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.7", "10.0.1.8"},
		podV6: []string{"fd00::1", "fd00::2", "fd00::3", "fd00::4", "fd00::5", "fd00::1:6", "fd00::1:7", "fd00::1:8"},
	}
	// diffLarge: enough pods to cross every word and block boundary an index might have, with
	// address pools wide enough that most pods own their address.
	diffLarge = &diffConfig{minPods: 40, maxPods: 160, maxPolicies: 24, flowsPerCheck: 400, podV4: diffPool4(220), podV6: diffPool6(220)}
	// Addresses that are nobody's: inside and outside the ipBlocks' prefixes.
	diffOutside = []string{"10.0.0.9", "10.0.2.1", "10.1.0.1", "192.168.1.1", "8.8.8.8", "0.0.0.1",
		"fd00::9", "fd00::2:1", "fd01::1", "2001:db8::1", "::1"}
	// Flow ports sit on and next to every port, range end and container port above.
	diffFlowPorts = []uint16{0, 52, 53, 54, 79, 80, 81, 82, 83, 84, 85, 86, 8079, 8080, 8081, 8084, 8085, 8086, 8090, 8091, 65535}
)

// diffConfig sizes the random clusters.
type diffConfig struct {
	minPods, maxPods int
	maxPolicies      int
	flowsPerCheck    int
	podV4, podV6     []string
}

func diffPool4(n int) []string {
	var out []string
	for i := 1; i <= n; i++ {
		out = append(out, netip.AddrFrom4([4]byte{10, 0, byte(i / 128), byte(i % 128)}).String())
	}
	return out
}

func diffPool6(n int) []string {
	var out []string
	for i := 1; i <= n; i++ {
		out = append(out, netip.AddrFrom16([16]byte{0xfd, 0, 14: byte(i / 128), 15: byte(i % 128)}).String())
	}
	return out
}

var (
	diffFlowsChecked atomic.Int64
	// diffReasons counts the reference's verdicts by reason, to show the mix is not one-sided.
	diffReasons [4]atomic.Int64
)

func TestDifferential(t *testing.T) {
	target := int64(diffDefaultFlows)
	if s := os.Getenv("SLUICE_DIFF_FLOWS"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("SLUICE_DIFF_FLOWS=%q: want a positive number of flows", s)
		}
		target = n
	}
	diffFlowsChecked.Store(0)
	for i := range diffReasons {
		diffReasons[i].Store(0)
	}
	clusters := 0
	for diffFlowsChecked.Load() < target {
		rapid.Check(t, func(rt *rapid.T) {
			diffProperty(rt, diffSmall)
		})
		if t.Failed() {
			break
		}
		clusters++
	}
	t.Logf("differential: %d flows checked over %d rapid runs (target %d); verdicts: %d unisolated, %d rule, %d egress-denied, %d ingress-denied",
		diffFlowsChecked.Load(), clusters, target, diffReasons[policy.ReasonUnisolated].Load(), diffReasons[policy.ReasonRule].Load(),
		diffReasons[policy.ReasonEgress].Load(), diffReasons[policy.ReasonIngress].Load())
	if !t.Failed() && diffFlowsChecked.Load() < target {
		t.Fatalf("only %d flows checked, want at least %d", diffFlowsChecked.Load(), target)
	}
}

func diffProperty(rt *rapid.T, cfg *diffConfig) {
	st := drawState(rt, cfg)
	opt := policy.Options{Node: rapid.SampledFrom([]string{"", "", "node-a", "node-b", "node-c"}).Draw(rt, "node"), Generation: 7}
	seed := rapid.Uint64().Draw(rt, "flowseed")
	// The generator writes only what the API server would accept; hold it (and Validate) to
	// that.
	vst := cloneState(st)
	policy.Default(vst)
	if err := policy.Validate(vst); err != nil {
		rt.Fatalf("Validate rejects a generated state: %v\n%s", err, stateYAML(st, opt))
	}
	before := cloneState(st)
	snap, err := policy.Compile(st, opt)
	if err != nil {
		rt.Fatalf("Compile failed on a valid state: %v\n%s", err, stateYAML(st, opt))
	}
	// Compile reads st (informer caches hand it shared objects); it must not default in place.
	if !reflect.DeepEqual(before, st) {
		rt.Fatalf("Compile modified its input state\nbefore:\n%s\nafter:\n%s", stateYAML(before, opt), stateYAML(st, opt))
	}
	if snap.Generation() != 7 {
		rt.Fatalf("Generation() = %d, want 7", snap.Generation())
	}
	diffCheck(rt, st, opt, snap, seed, cfg.flowsPerCheck)
}

// diffCheck compares every public answer of snap, compiled from st with opt, with the
// reference: address owners, LocalPodIPs, Pods, PodIPs, Stats, and Decide and Explain on
// flows random flows drawn with seed.
func diffCheck(rt *rapid.T, st *policy.State, opt policy.Options, snap *policy.Snapshot, seed uint64, flows int) {
	addrs := diffAddrs(st)
	var owned []netip.Addr // addresses of participating pods: most flows start or end there
	for _, a := range addrs {
		if msg := diffOwner(st, opt, snap, a); msg != "" {
			rt.Fatalf("%s\n%s", msg, stateYAML(st, opt))
		}
		if _, _, ok := policy.RefOwner(st, opt, a); ok {
			owned = append(owned, a)
		}
	}
	// LocalPodIPs, as documented: every address a local pod owns (the addresses whose packets
	// this node must queue), each once.
	wantLocal := policy.RefLocalPodIPs(st, opt)
	gotLocal := slices.Clone(snap.LocalPodIPs())
	for _, l := range [][]netip.Addr{wantLocal, gotLocal} {
		slices.SortFunc(l, netip.Addr.Compare)
	}
	wantLocal = slices.Compact(wantLocal)
	if !slices.Equal(gotLocal, wantLocal) {
		rt.Fatalf("LocalPodIPs() = %v; reference (addresses of local pods) %v\n%s", gotLocal, wantLocal, stateYAML(st, opt))
	}
	// Pods, PodIPs and Stats against the reference's list of participating pods.
	refs, refIPs, refLocal := policy.RefPods(st, opt)
	if got := snap.Pods(); !slices.Equal(got, refs) {
		rt.Fatalf("Pods() = %v; reference %v\n%s", got, refs, stateYAML(st, opt))
	}
	nLocal := 0
	for i, ref := range refs {
		if got := snap.PodIPs(ref); !slices.Equal(got, refIPs[i]) {
			rt.Fatalf("PodIPs(%v) = %v; reference %v\n%s", ref, got, refIPs[i], stateYAML(st, opt))
		}
		if refLocal[i] {
			nLocal++
		}
	}
	for _, p := range st.Pods {
		ref := policy.PodRef{Namespace: p.Namespace, Name: p.Name}
		if !slices.Contains(refs, ref) && snap.PodIPs(ref) != nil {
			rt.Fatalf("PodIPs(%v) = %v for a pod that takes no part", ref, snap.PodIPs(ref))
		}
	}
	if s := snap.Stats(); s.Pods != len(refs) || s.LocalPods != nLocal || s.Policies != len(st.Policies) {
		rt.Fatalf("Stats() = %+v; reference %d pods, %d local, %d policies\n%s", s, len(refs), nLocal, len(st.Policies), stateYAML(st, opt))
	}
	// Odd flows the packet path could still hand over: no addresses at all, one missing.
	for _, f := range []policy.Flow{{}, {Dst: netip.MustParseAddr("10.0.0.1"), Proto: policy.TCP, Port: 80}, {Src: netip.MustParseAddr("10.0.0.1")}} {
		if msg := diffMismatch(st, opt, snap, f); msg != "" {
			rt.Fatalf("%s\n%s", msg, stateYAML(st, opt))
		}
	}
	r := rand.New(rand.NewPCG(seed, 1))
	ports := diffPorts(st)
	for i := 0; i < flows; i++ {
		f := diffFlow(r, addrs, owned, ports)
		if msg := diffMismatch(st, opt, snap, f); msg != "" {
			min := minimize(st, opt, f)
			rt.Fatalf("%s\nminimal state (%d namespaces, %d pods, %d policies):\n%s",
				msg, len(min.Namespaces), len(min.Pods), len(min.Policies), stateYAML(min, opt))
		}
		diffFlowsChecked.Add(1)
	}
}

// diffMismatch compares every public answer about f with the reference; "" when all agree.
func diffMismatch(st *policy.State, opt policy.Options, snap *policy.Snapshot, f policy.Flow) string {
	want := policy.ReferenceDecide(st, opt, f)
	got := snap.Decide(f)
	ex := snap.Explain(f)
	if int(want.Reason) < len(diffReasons) {
		diffReasons[want.Reason].Add(1)
	}
	if got != want || ex.Allowed != got.Allowed || ex.Reason != got.Reason.String() {
		return fmt.Sprintf("flow %s -> %s %d/%s (node %q): Decide=%v/%s Explain=%v/%s Reference=%v/%s",
			f.Src, f.Dst, f.Port, f.Proto, opt.Node, got.Allowed, got.Reason, ex.Allowed, ex.Reason, want.Allowed, want.Reason)
	}
	if ex.Protocol != f.Proto.String() || ex.Port != f.Port {
		return fmt.Sprintf("flow %s -> %s %d/%s: Explain says %d/%s", f.Src, f.Dst, f.Port, f.Proto, ex.Port, ex.Protocol)
	}
	eg, in := policy.RefSides(st, opt, f)
	for _, c := range []struct {
		dir  policy.Direction
		side policy.Side
		ref  policy.RefSide
	}{{policy.Egress, ex.Egress, eg}, {policy.Ingress, ex.Ingress, in}} {
		if msg := diffSide(st, c.dir, c.side, c.ref); msg != "" {
			return fmt.Sprintf("flow %s -> %s %d/%s (node %q): Explain %s side: %s", f.Src, f.Dst, f.Port, f.Proto, opt.Node, c.dir, msg)
		}
	}
	for _, e := range []struct {
		name string
		ep   policy.Endpoint
		addr netip.Addr
	}{{"source", ex.Source, f.Src}, {"destination", ex.Destination, f.Dst}} {
		ref, local, ok := policy.RefOwner(st, opt, e.addr)
		if e.ep.IP != e.addr || (e.ep.Pod != nil) != ok || (ok && (*e.ep.Pod != ref || e.ep.Local != local)) {
			return fmt.Sprintf("flow %s -> %s: Explain %s = %+v; reference owner %v ok=%v local=%v", f.Src, f.Dst, e.name, e.ep, ref, ok, local)
		}
	}
	return ""
}

// diffSide compares one side of an Explanation with the reference's findings. Peer and Port of
// a RuleRef are checked for shape only (-1 exactly when the rule has no peers / no ports).
func diffSide(st *policy.State, dir policy.Direction, side policy.Side, ref policy.RefSide) string {
	if side.Enforced != ref.Judged {
		return fmt.Sprintf("Enforced=%v, reference judges=%v", side.Enforced, ref.Judged)
	}
	if !ref.Judged {
		if !side.Allowed {
			return "not enforced but Allowed=false"
		}
		return ""
	}
	isolated := len(ref.Isolating) > 0
	allowed := !isolated || len(ref.Matched) > 0
	if side.Isolated != isolated || side.Allowed != allowed {
		return fmt.Sprintf("Isolated=%v Allowed=%v, reference %v %v", side.Isolated, side.Allowed, isolated, allowed)
	}
	gotIso := slices.Clone(side.IsolatingPolicies)
	slices.Sort(gotIso)
	wantIso := slices.Clone(ref.Isolating)
	slices.Sort(wantIso)
	if !slices.Equal(gotIso, wantIso) {
		return fmt.Sprintf("IsolatingPolicies=%v, reference %v", gotIso, wantIso)
	}
	type key struct {
		policy string
		dir    policy.Direction
		rule   int
	}
	gotRules := map[key]bool{}
	for _, m := range side.MatchedBy {
		gotRules[key{m.Policy, m.Direction, m.Rule}] = true
		peers, ports, ok := diffRuleShape(st, m)
		if !ok {
			return fmt.Sprintf("MatchedBy %+v names no rule of the state", m)
		}
		if (m.Peer == -1) != (peers == 0) || m.Peer >= peers || (m.Port == -1) != (ports == 0) || m.Port >= ports {
			return fmt.Sprintf("MatchedBy %+v: the rule has %d peers and %d ports", m, peers, ports)
		}
	}
	wantRules := map[key]bool{}
	if isolated {
		for _, m := range ref.Matched {
			wantRules[key{m.Policy, m.Direction, m.Rule}] = true
		}
	}
	if !maps.Equal(gotRules, wantRules) {
		return fmt.Sprintf("MatchedBy rules %v, reference %v", gotRules, wantRules)
	}
	return ""
}

// diffRuleShape finds the rule m points at and counts its peers and ports.
func diffRuleShape(st *policy.State, m policy.RuleRef) (peers, ports int, ok bool) {
	for _, np := range st.Policies {
		if np.Namespace+"/"+np.Name != m.Policy {
			continue
		}
		switch {
		case m.Direction == policy.Ingress && m.Rule >= 0 && m.Rule < len(np.Spec.Ingress):
			r := np.Spec.Ingress[m.Rule]
			return len(r.From), len(r.Ports), true
		case m.Direction == policy.Egress && m.Rule >= 0 && m.Rule < len(np.Spec.Egress):
			r := np.Spec.Egress[m.Rule]
			return len(r.To), len(r.Ports), true
		}
	}
	return 0, 0, false
}

func diffOwner(st *policy.State, opt policy.Options, snap *policy.Snapshot, a netip.Addr) string {
	ref, local, ok := policy.RefOwner(st, opt, a)
	got, gotOK := snap.Pod(a)
	if ok != gotOK || got != ref {
		return fmt.Sprintf("Pod(%s) = %v,%v; reference owner %v,%v (node %q)", a, got, gotOK, ref, ok, opt.Node)
	}
	if gl := snap.IsLocal(a); gl != (ok && local) {
		return fmt.Sprintf("IsLocal(%s) = %v; reference %v (owner %v, node %q)", a, gl, ok && local, ref, opt.Node)
	}
	return ""
}

// diffAddrs lists every address worth asking about: each pod's (participating or not) and the
// outside ones.
func diffAddrs(st *policy.State) []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	for _, p := range st.Pods {
		add(p.Status.PodIP)
		for _, ip := range p.Status.PodIPs {
			add(ip.IP)
		}
	}
	for _, s := range diffOutside {
		add(s)
	}
	return out
}

type diffPort struct {
	proto policy.Protocol
	port  uint16
}

// diffPorts lists the protocol/port pairs the state talks about, and their neighbours, so that
// flows hit rules' ports and range ends often.
func diffPorts(st *policy.State) []diffPort {
	var out []diffPort
	add := func(proto policy.Protocol, ports ...int32) {
		for _, p := range ports {
			if p >= 0 && p <= 65535 {
				out = append(out, diffPort{proto, uint16(p)})
			}
		}
	}
	for _, p := range st.Pods {
		for _, c := range append(slices.Clone(p.Spec.Containers), p.Spec.InitContainers...) {
			for _, cp := range c.Ports {
				proto, _ := policy.ProtocolFromK8s(cp.Protocol)
				add(proto, cp.ContainerPort)
			}
		}
	}
	for _, np := range st.Policies {
		var all []networkingv1.NetworkPolicyPort
		for _, r := range np.Spec.Ingress {
			all = append(all, r.Ports...)
		}
		for _, r := range np.Spec.Egress {
			all = append(all, r.Ports...)
		}
		for _, pp := range all {
			proto := policy.TCP
			if pp.Protocol != nil {
				proto, _ = policy.ProtocolFromK8s(*pp.Protocol)
			}
			switch {
			case pp.Port == nil:
				add(proto, 1, 80, 65535)
			case pp.Port.Type == intstr.Int:
				add(proto, pp.Port.IntVal-1, pp.Port.IntVal, pp.Port.IntVal+1)
				if pp.EndPort != nil {
					add(proto, *pp.EndPort, *pp.EndPort+1)
				}
			}
		}
	}
	return out
}

func diffFlow(r *rand.Rand, addrs, owned []netip.Addr, ports []diffPort) policy.Flow {
	pick := func() netip.Addr {
		if len(owned) > 0 && r.IntN(4) != 0 {
			return owned[r.IntN(len(owned))]
		}
		return addrs[r.IntN(len(addrs))]
	}
	for {
		src, dst := pick(), pick()
		if src.Is4() != dst.Is4() {
			continue
		}
		f := policy.Flow{Src: src, Dst: dst}
		switch k := r.IntN(20); {
		case k < 8:
			f.Proto = policy.TCP
		case k < 13:
			f.Proto = policy.UDP
		case k < 18:
			f.Proto = policy.SCTP
		case k < 19:
			f.Proto = 1 // ICMP: only rules without ports admit it
		default:
			f.Proto = 58
		}
		f.Port = diffFlowPorts[r.IntN(len(diffFlowPorts))]
		if f.Proto == 1 || f.Proto == 58 {
			f.Port = 0
		} else if len(ports) > 0 && r.IntN(2) == 0 {
			p := ports[r.IntN(len(ports))]
			f.Proto, f.Port = p.proto, p.port
		}
		return f
	}
}

// ---- generators --------------------------------------------------------------------------

func drawLabels(rt *rapid.T, label string) map[string]string {
	n := rapid.IntRange(0, len(diffLabelKeys)).Draw(rt, label+".n")
	if n == 0 {
		return nil
	}
	m := map[string]string{}
	for _, k := range rapid.Permutation(diffLabelKeys).Draw(rt, label+".keys")[:n] {
		m[k] = rapid.SampledFrom(diffLabelVals).Draw(rt, label+".v")
	}
	return m
}

func drawSelector(rt *rapid.T, label string, nsSelector bool) *metav1.LabelSelector {
	sel := &metav1.LabelSelector{}
	keys := diffLabelKeys
	if nsSelector {
		keys = append([]string{"kubernetes.io/metadata.name"}, diffLabelKeys...)
	}
	value := func(k string) string {
		if k == "kubernetes.io/metadata.name" {
			return rapid.SampledFrom(diffNamespaces).Draw(rt, label+".ns")
		}
		return rapid.SampledFrom(diffLabelVals).Draw(rt, label+".v")
	}
	if rapid.IntRange(0, 2).Draw(rt, label+".hasML") > 0 {
		for i, n := 0, rapid.IntRange(1, 2).Draw(rt, label+".nml"); i < n; i++ {
			k := rapid.SampledFrom(keys).Draw(rt, label+".k")
			if sel.MatchLabels == nil {
				sel.MatchLabels = map[string]string{}
			}
			sel.MatchLabels[k] = value(k)
		}
	}
	for i, n := 0, rapid.IntRange(0, 2).Draw(rt, label+".nme"); i < n; i++ {
		k := rapid.SampledFrom(keys).Draw(rt, label+".k")
		op := rapid.SampledFrom([]metav1.LabelSelectorOperator{
			metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn, metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist,
		}).Draw(rt, label+".op")
		req := metav1.LabelSelectorRequirement{Key: k, Operator: op}
		if op == metav1.LabelSelectorOpIn || op == metav1.LabelSelectorOpNotIn {
			for j, m := 0, rapid.IntRange(1, 2).Draw(rt, label+".nv"); j < m; j++ {
				req.Values = append(req.Values, value(k))
			}
		}
		sel.MatchExpressions = append(sel.MatchExpressions, req)
	}
	return sel
}

func drawPod(rt *rapid.T, cfg *diffConfig, i int) corev1.Pod {
	p := corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: rapid.SampledFrom(diffNamespaces).Draw(rt, "pod.ns"),
			Name:      fmt.Sprintf("p%d", i),
			Labels:    drawLabels(rt, "pod.labels"),
		},
		// "" : not scheduled (yet) in the file; local only when Options.Node is empty.
		Spec: corev1.PodSpec{NodeName: rapid.SampledFrom(append([]string{""}, diffNodes...)).Draw(rt, "pod.node")},
	}
	// Containers, then at most one init container: a sidecar (restartPolicy Always), whose
	// named ports count, or an ordinary one, whose ports do not.
	nc, ni := rapid.IntRange(1, 2).Draw(rt, "pod.ncont"), min(1, rapid.IntRange(0, 3).Draw(rt, "pod.ninit"))
	for c := 0; c < nc+ni; c++ {
		ctr := corev1.Container{Name: fmt.Sprintf("c%d", c), Image: "img"}
		if c >= nc && rapid.IntRange(0, 2).Draw(rt, "init.kind") > 0 {
			always := corev1.ContainerRestartPolicyAlways
			ctr.RestartPolicy = &always
		}
		// Names are unique within a container (the API server insists) but may repeat across
		// containers.
		used := map[string]bool{}
		for j, np := 0, rapid.IntRange(0, 3).Draw(rt, "pod.nports"); j < np; j++ {
			cp := corev1.ContainerPort{ContainerPort: rapid.SampledFrom(diffPortNums).Draw(rt, "cport")}
			if name := rapid.SampledFrom(append([]string{""}, diffPortNames[:3]...)).Draw(rt, "cport.name"); name != "" && !used[name] {
				used[name] = true
				cp.Name = name
			}
			if k := rapid.IntRange(0, 3).Draw(rt, "cport.proto"); k < 3 {
				cp.Protocol = diffProtos[k]
			}
			ctr.Ports = append(ctr.Ports, cp)
		}
		if c < nc {
			p.Spec.Containers = append(p.Spec.Containers, ctr)
		} else {
			p.Spec.InitContainers = append(p.Spec.InitContainers, ctr)
		}
	}
	v4 := rapid.SampledFrom(cfg.podV4).Draw(rt, "pod.v4")
	v6 := rapid.SampledFrom(cfg.podV6).Draw(rt, "pod.v6")
	switch rapid.IntRange(0, 5).Draw(rt, "pod.ipmode") {
	case 0, 1:
		p.Status.PodIP, p.Status.PodIPs = v4, []corev1.PodIP{{IP: v4}}
	case 2:
		p.Status.PodIP, p.Status.PodIPs = v4, []corev1.PodIP{{IP: v4}, {IP: v6}}
	case 3:
		p.Status.PodIP, p.Status.PodIPs = v6, []corev1.PodIP{{IP: v6}, {IP: v4}}
	case 4:
		p.Status.PodIP = v4 // an old status with only podIP
	case 5:
		// no address yet
	}
	p.Status.Phase = rapid.SampledFrom([]corev1.PodPhase{
		corev1.PodRunning, corev1.PodRunning, corev1.PodRunning, corev1.PodPending, corev1.PodSucceeded, corev1.PodFailed, corev1.PodUnknown, "",
	}).Draw(rt, "pod.phase")
	p.Spec.HostNetwork = rapid.IntRange(0, 9).Draw(rt, "pod.hostnet") == 0
	if rapid.IntRange(0, 5).Draw(rt, "pod.terminating") == 0 {
		p.DeletionTimestamp = &metav1.Time{Time: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	}
	return p
}

func drawIPBlock(rt *rapid.T, cfg *diffConfig) *networkingv1.IPBlock {
	pool := append(append([]string{}, cfg.podV4...), cfg.podV6...)
	pool = append(pool, diffOutside...)
	base := netip.MustParseAddr(rapid.SampledFrom(pool).Draw(rt, "ipb.base"))
	var lens []int
	if base.Is4() {
		lens = []int{0, 8, 16, 23, 24, 29, 30, 31, 32}
	} else {
		lens = []int{0, 8, 16, 64, 112, 120, 126, 127, 128}
	}
	bits := rapid.SampledFrom(lens).Draw(rt, "ipb.len")
	cidr := netip.PrefixFrom(base, bits).Masked()
	b := &networkingv1.IPBlock{CIDR: cidr.String()}
	for i, n := 0, rapid.IntRange(0, 2).Draw(rt, "ipb.nexcept"); i < n; i++ {
		// except must lie inside cidr: take an address inside and a longer prefix.
		var inside []netip.Addr
		for _, s := range pool {
			if a := netip.MustParseAddr(s); cidr.Contains(a) {
				inside = append(inside, a)
			}
		}
		if len(inside) == 0 || bits == cidr.Addr().BitLen() {
			break
		}
		a := rapid.SampledFrom(inside).Draw(rt, "ipb.exa")
		exBits := rapid.IntRange(bits+1, a.BitLen()).Draw(rt, "ipb.exlen")
		b.Except = append(b.Except, netip.PrefixFrom(a, exBits).Masked().String())
	}
	return b
}

func drawPeer(rt *rapid.T, cfg *diffConfig) networkingv1.NetworkPolicyPeer {
	switch rapid.IntRange(0, 3).Draw(rt, "peer.kind") {
	case 0:
		return networkingv1.NetworkPolicyPeer{PodSelector: drawSelector(rt, "peer.pod", false)}
	case 1:
		return networkingv1.NetworkPolicyPeer{NamespaceSelector: drawSelector(rt, "peer.ns", true)}
	case 2:
		return networkingv1.NetworkPolicyPeer{
			NamespaceSelector: drawSelector(rt, "peer.ns", true),
			PodSelector:       drawSelector(rt, "peer.pod", false),
		}
	}
	return networkingv1.NetworkPolicyPeer{IPBlock: drawIPBlock(rt, cfg)}
}

func drawPorts(rt *rapid.T) []networkingv1.NetworkPolicyPort {
	n := rapid.IntRange(0, 3).Draw(rt, "ports.n")
	if n == 0 {
		return nil
	}
	var out []networkingv1.NetworkPolicyPort
	for i := 0; i < n; i++ {
		var p networkingv1.NetworkPolicyPort
		if k := rapid.IntRange(0, 3).Draw(rt, "port.proto"); k < 3 {
			proto := diffProtos[k]
			p.Protocol = &proto
		}
		switch rapid.IntRange(0, 3).Draw(rt, "port.kind") {
		case 0: // protocol only: every port of it
		case 1:
			v := intstr.FromInt32(rapid.SampledFrom(diffPortNums).Draw(rt, "port.num"))
			p.Port = &v
		case 2:
			start := rapid.SampledFrom(diffPortNums).Draw(rt, "port.start")
			v := intstr.FromInt32(start)
			end := start + rapid.SampledFrom([]int32{0, 1, 5, 10}).Draw(rt, "port.span")
			p.Port, p.EndPort = &v, &end
		case 3:
			v := intstr.FromString(rapid.SampledFrom(diffPortNames).Draw(rt, "port.name"))
			p.Port = &v
		}
		out = append(out, p)
	}
	return out
}

func drawPolicy(rt *rapid.T, cfg *diffConfig, i int, podNamespaces []string) networkingv1.NetworkPolicy {
	// Mostly where the pods are, or the policy would isolate nobody.
	nss := diffNamespaces
	if len(podNamespaces) > 0 && rapid.IntRange(0, 3).Draw(rt, "np.nearpods") > 0 {
		nss = podNamespaces
	}
	np := networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: rapid.SampledFrom(nss).Draw(rt, "np.ns"),
			Name:      fmt.Sprintf("np%d", i),
		},
	}
	if rapid.IntRange(0, 2).Draw(rt, "np.selectall") > 0 {
		np.Spec.PodSelector = *drawSelector(rt, "np.sel", false)
	}
	// ingress/egress: absent, present but empty ([] allows nothing), or rules.
	switch rapid.IntRange(0, 2).Draw(rt, "np.ingress") {
	case 1:
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{}
	case 2:
		for j, n := 0, rapid.IntRange(1, 3).Draw(rt, "np.ningress"); j < n; j++ {
			var r networkingv1.NetworkPolicyIngressRule
			if rapid.IntRange(0, 3).Draw(rt, "rule.haspeers") > 0 {
				for k, m := 0, rapid.IntRange(1, 3).Draw(rt, "rule.npeers"); k < m; k++ {
					r.From = append(r.From, drawPeer(rt, cfg))
				}
			}
			r.Ports = drawPorts(rt)
			np.Spec.Ingress = append(np.Spec.Ingress, r)
		}
	}
	switch rapid.IntRange(0, 2).Draw(rt, "np.egress") {
	case 1:
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{}
	case 2:
		for j, n := 0, rapid.IntRange(1, 3).Draw(rt, "np.negress"); j < n; j++ {
			var r networkingv1.NetworkPolicyEgressRule
			if rapid.IntRange(0, 3).Draw(rt, "rule.haspeers") > 0 {
				for k, m := 0, rapid.IntRange(1, 3).Draw(rt, "rule.npeers"); k < m; k++ {
					r.To = append(r.To, drawPeer(rt, cfg))
				}
			}
			r.Ports = drawPorts(rt)
			np.Spec.Egress = append(np.Spec.Egress, r)
		}
	}
	switch rapid.IntRange(0, 4).Draw(rt, "np.types") {
	case 0, 1: // omitted: defaulted from the rules
	case 2:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	case 3:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	case 4:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
	}
	return np
}

func drawState(rt *rapid.T, cfg *diffConfig) *policy.State {
	st := &policy.State{}
	// Some namespaces have no object at all: they still carry their name label.
	for _, ns := range rapid.Permutation(diffNamespaces).Draw(rt, "nss")[:rapid.IntRange(0, len(diffNamespaces)).Draw(rt, "nns")] {
		o := corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: drawLabels(rt, "ns.labels")}}
		switch rapid.IntRange(0, 5).Draw(rt, "ns.namelabel") {
		case 0, 1, 2:
			if o.Labels == nil {
				o.Labels = map[string]string{}
			}
			o.Labels["kubernetes.io/metadata.name"] = ns
		case 3:
			// A hand-edited file with a wrong name label: the API server would overwrite it
			// with the namespace's name, and so must sluice.
			if o.Labels == nil {
				o.Labels = map[string]string{}
			}
			o.Labels["kubernetes.io/metadata.name"] = rapid.SampledFrom(diffNamespaces).Draw(rt, "ns.wrongname")
		}
		st.Namespaces = append(st.Namespaces, o)
	}
	for i, n := 0, rapid.IntRange(cfg.minPods, cfg.maxPods).Draw(rt, "npods"); i < n; i++ {
		st.Pods = append(st.Pods, drawPod(rt, cfg, i))
	}
	var podNamespaces []string
	for _, p := range st.Pods {
		podNamespaces = append(podNamespaces, p.Namespace)
	}
	for i, n := 0, rapid.IntRange(1, cfg.maxPolicies).Draw(rt, "npolicies"); i < n; i++ {
		st.Policies = append(st.Policies, drawPolicy(rt, cfg, i, podNamespaces))
	}
	return st
}

// ---- reporting ---------------------------------------------------------------------------

// minimize greedily drops objects, rules, peers and ports while the disagreement on f
// persists, so the report shows only what matters.
func minimize(st *policy.State, opt policy.Options, f policy.Flow) *policy.State {
	fails := func(s *policy.State) bool {
		snap, err := policy.Compile(s, opt)
		if err != nil {
			return false
		}
		return diffMismatch(s, opt, snap, f) != ""
	}
	cur := cloneState(st)
	for changed := true; changed; {
		changed = false
		try := func(mut func(*policy.State) bool) {
			c := cloneState(cur)
			if mut(c) && fails(c) {
				cur, changed = c, true
			}
		}
		for i := len(cur.Policies) - 1; i >= 0; i-- {
			try(func(s *policy.State) bool {
				if i >= len(s.Policies) {
					return false
				}
				s.Policies = append(s.Policies[:i], s.Policies[i+1:]...)
				return true
			})
		}
		for i := len(cur.Pods) - 1; i >= 0; i-- {
			try(func(s *policy.State) bool {
				if i >= len(s.Pods) {
					return false
				}
				s.Pods = append(s.Pods[:i], s.Pods[i+1:]...)
				return true
			})
		}
		for i := len(cur.Namespaces) - 1; i >= 0; i-- {
			try(func(s *policy.State) bool {
				if i >= len(s.Namespaces) {
					return false
				}
				s.Namespaces = append(s.Namespaces[:i], s.Namespaces[i+1:]...)
				return true
			})
		}
		for pi := range cur.Pods {
			try(func(s *policy.State) bool {
				if len(s.Pods[pi].Spec.InitContainers) == 0 {
					return false
				}
				s.Pods[pi].Spec.InitContainers = nil
				return true
			})
			for ci := range cur.Pods[pi].Spec.Containers {
				for k := len(cur.Pods[pi].Spec.Containers[ci].Ports) - 1; k >= 0; k-- {
					try(func(s *policy.State) bool {
						ps := s.Pods[pi].Spec.Containers[ci].Ports
						s.Pods[pi].Spec.Containers[ci].Ports = append(ps[:k:k], ps[k+1:]...)
						return true
					})
				}
			}
		}
		for pi := range cur.Policies {
			for ri := range cur.Policies[pi].Spec.Ingress {
				for k := len(cur.Policies[pi].Spec.Ingress[ri].From) - 1; k >= 0; k-- {
					try(func(s *policy.State) bool {
						ps := s.Policies[pi].Spec.Ingress[ri].From
						s.Policies[pi].Spec.Ingress[ri].From = append(ps[:k:k], ps[k+1:]...)
						return true
					})
				}
				for k := len(cur.Policies[pi].Spec.Ingress[ri].Ports) - 1; k >= 0; k-- {
					try(func(s *policy.State) bool {
						ps := s.Policies[pi].Spec.Ingress[ri].Ports
						s.Policies[pi].Spec.Ingress[ri].Ports = append(ps[:k:k], ps[k+1:]...)
						return true
					})
				}
			}
			for ri := range cur.Policies[pi].Spec.Egress {
				for k := len(cur.Policies[pi].Spec.Egress[ri].To) - 1; k >= 0; k-- {
					try(func(s *policy.State) bool {
						ps := s.Policies[pi].Spec.Egress[ri].To
						s.Policies[pi].Spec.Egress[ri].To = append(ps[:k:k], ps[k+1:]...)
						return true
					})
				}
				for k := len(cur.Policies[pi].Spec.Egress[ri].Ports) - 1; k >= 0; k-- {
					try(func(s *policy.State) bool {
						ps := s.Policies[pi].Spec.Egress[ri].Ports
						s.Policies[pi].Spec.Egress[ri].Ports = append(ps[:k:k], ps[k+1:]...)
						return true
					})
				}
			}
			for ri := len(cur.Policies[pi].Spec.Ingress) - 1; ri >= 0; ri-- {
				try(func(s *policy.State) bool {
					r := s.Policies[pi].Spec.Ingress
					s.Policies[pi].Spec.Ingress = append(r[:ri:ri], r[ri+1:]...)
					return true
				})
			}
			for ri := len(cur.Policies[pi].Spec.Egress) - 1; ri >= 0; ri-- {
				try(func(s *policy.State) bool {
					r := s.Policies[pi].Spec.Egress
					s.Policies[pi].Spec.Egress = append(r[:ri:ri], r[ri+1:]...)
					return true
				})
			}
		}
	}
	return cur
}

func cloneState(st *policy.State) *policy.State {
	c := &policy.State{}
	for i := range st.Namespaces {
		c.Namespaces = append(c.Namespaces, *st.Namespaces[i].DeepCopy())
	}
	for i := range st.Pods {
		c.Pods = append(c.Pods, *st.Pods[i].DeepCopy())
	}
	for i := range st.Policies {
		c.Policies = append(c.Policies, *st.Policies[i].DeepCopy())
	}
	return c
}

// stateYAML renders st as the multi-document file `sluice explain --state` reads.
func stateYAML(st *policy.State, opt policy.Options) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Options.Node=%q\n", opt.Node)
	emit := func(o any) {
		y, err := yaml.Marshal(o)
		if err != nil {
			fmt.Fprintf(&b, "# marshal: %v\n", err)
			return
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	for _, o := range st.Namespaces {
		o.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"}
		emit(o)
	}
	for _, o := range st.Pods {
		o.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
		emit(o)
	}
	for _, o := range st.Policies {
		o.TypeMeta = metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"}
		emit(o)
	}
	return b.String()
}

// TestDifferentialLarge runs the same property on clusters of up to 160 pods and 24 policies,
// fewer flows each.
func TestDifferentialLarge(t *testing.T) {
	before := diffFlowsChecked.Load()
	rapid.Check(t, func(rt *rapid.T) { diffProperty(rt, diffLarge) })
	t.Logf("differential (large clusters): %d flows checked", diffFlowsChecked.Load()-before)
}

// TestDifferentialClustergen compares Decide with the reference on the benchmark's realistic
// clusters too: large selectors, many namespaces, names resolved per destination pod.
func TestDifferentialClustergen(t *testing.T) {
	type clusterCase struct {
		policies int
		node     string
		flows    int
	}
	cases := []clusterCase{{100, "", 800}, {100, "node-2", 600}, {200, "node-5", 300}}
	if os.Getenv("SLUICE_DIFF_FLOWS") != "" {
		// The long mode also walks a benchmark-sized cluster (the reference needs ms per flow).
		cases = append(cases, clusterCase{1000, "", 3000}, clusterCase{1000, "node-7", 3000})
	}
	for _, tc := range cases {
		st := clustergen.Generate(tc.policies, uint64(tc.policies))
		opt := policy.Options{Node: tc.node}
		snap, err := policy.Compile(st, opt)
		if err != nil {
			t.Fatal(err)
		}
		var reasons [4]int
		for _, f := range clustergen.Flows(st, tc.flows, 9) {
			if msg := diffMismatch(st, opt, snap, f); msg != "" {
				t.Fatalf("clustergen(%d): %s", tc.policies, msg)
			}
			reasons[policy.ReferenceDecide(st, opt, f).Reason]++
		}
		t.Logf("clustergen(%d) node %q: %v flows by reason (unisolated, rule, egress-denied, ingress-denied)", tc.policies, tc.node, reasons)
	}
}
