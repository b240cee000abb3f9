package filter

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/sluice-dev/sluice/policy"
)

// A two-namespace state: "prod" denies all ingress; backend takes TCP 8080 from frontend;
// dns takes UDP 53 from everyone in prod; sctp-srv takes SCTP 3868 from frontend.
const testState = `
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: prod, labels: {tier: frontend}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:244::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: prod, labels: {tier: backend}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.20, podIPs: [{ip: 10.244.1.20}, {ip: "fd00:244::20"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: prod, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.30}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-frontend, namespace: prod}
spec:
  podSelector: {matchLabels: {tier: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {tier: frontend}}}]
    ports: [{port: 8080}, {port: 3868, protocol: SCTP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: prod}
spec:
  podSelector: {matchLabels: {k8s-app: kube-dns}}
  ingress:
  - ports: [{port: 53, protocol: UDP}]
`

var (
	fe  = netip.MustParseAddr("10.244.1.10")
	be  = netip.MustParseAddr("10.244.1.20")
	dns = netip.MustParseAddr("10.244.1.30")
)

func compileTest(t testing.TB, gen uint64, extra string) *policy.Snapshot {
	t.Helper()
	st, _, err := policy.Load(strings.NewReader(testState+extra), "test")
	if err != nil {
		t.Fatal(err)
	}
	s, err := policy.Compile(st, policy.Options{Generation: gen})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func pkt(src, dst netip.Addr, proto policy.Protocol, sport, dport uint16, flags uint8) *Packet {
	return &Packet{Flow: policy.Flow{Src: src, Dst: dst, Proto: proto, Port: dport}, SrcPort: sport, Kind: KindPorts, TCPFlags: flags}
}

func TestJudge(t *testing.T) {
	s := compileTest(t, 1, "")
	now := time.Now().UnixNano()
	type step struct {
		name  string
		p     *Packet
		want  bool
		cause Reason
	}
	echo := func(src, dst netip.Addr, kind Kind, id uint16) *Packet {
		return &Packet{Flow: policy.Flow{Src: src, Dst: dst, Proto: 1}, Kind: kind, ID: id}
	}
	steps := []step{
		// Forged packets that cannot open a connection, before any connection exists: the
		// reverse flow being allowed is no reason to let them through.
		{"backend:8080->frontend ACK before any connection: dropped", pkt(be, fe, policy.TCP, 8080, 40000, tcpACK), false, ReasonNoConnection},
		{"frontend->backend:8080 ACK before any connection: dropped", pkt(fe, be, policy.TCP, 40000, 8080, tcpACK), false, ReasonNoConnection},
		{"frontend->backend:8080 SYN allowed by rule", pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN), true, ReasonRule},
		{"backend->frontend:40000 SYN denied (frontend isolated)", pkt(be, fe, policy.TCP, 8080, 40000, tcpSYN), false, ReasonIngressDenied},
		// After a conntrack flush the connection's own packets arrive as NEW: the table has it.
		{"backend:8080->frontend SYN-ACK of the accepted SYN: tracked", pkt(be, fe, policy.TCP, 8080, 40000, tcpSYN|tcpACK), true, ReasonTracked},
		{"backend:8080->frontend ACK of the accepted connection: tracked", pkt(be, fe, policy.TCP, 8080, 40000, tcpACK), true, ReasonTracked},
		{"frontend->backend:8080 ACK of the accepted connection: tracked", pkt(fe, be, policy.TCP, 40000, 8080, tcpACK), true, ReasonTracked},
		{"backend:9999->frontend ACK: belongs to no connection", pkt(be, fe, policy.TCP, 9999, 40000, tcpACK), false, ReasonNoConnection},
		{"frontend:40001->backend:8080 ACK: another source port, no connection", pkt(fe, be, policy.TCP, 40001, 8080, tcpACK), false, ReasonNoConnection},
		{"frontend->backend:9090 denied", pkt(fe, be, policy.TCP, 40000, 9090, tcpSYN), false, ReasonIngressDenied},
		{"dns:53->frontend UDP before any query: denied", pkt(dns, fe, policy.UDP, 53, 5353, 0), false, ReasonIngressDenied},
		{"frontend->dns:53 UDP query allowed", pkt(fe, dns, policy.UDP, 5353, 53, 0), true, ReasonRule},
		{"dns:53->frontend:5353 UDP answer: tracked", pkt(dns, fe, policy.UDP, 53, 5353, 0), true, ReasonTracked},
		{"dns:53->frontend:5354 UDP to another port: denied", pkt(dns, fe, policy.UDP, 53, 5354, 0), false, ReasonIngressDenied},
		{"frontend->backend SCTP INIT allowed", &Packet{Flow: policy.Flow{Src: fe, Dst: be, Proto: policy.SCTP, Port: 3868}, SrcPort: 7, Kind: KindPorts, SCTPChunk: sctpInit}, true, ReasonRule},
		{"backend->frontend SCTP DATA of it: tracked", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.SCTP, Port: 7}, SrcPort: 3868, Kind: KindPorts}, true, ReasonTracked},
		// A SYN or INIT always opens, even on a tracked 5-tuple.
		{"backend->frontend SCTP INIT on the tracked 5-tuple: judged, denied", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.SCTP, Port: 7}, SrcPort: 3868, Kind: KindPorts, SCTPChunk: sctpInit}, false, ReasonIngressDenied},
		{"backend:8080->frontend:40000 SYN on the tracked 5-tuple: judged, denied", pkt(be, fe, policy.TCP, 8080, 40000, tcpSYN), false, ReasonIngressDenied},
		{"ICMP echo to isolated pod denied", echo(be, fe, KindQuery, 1), false, ReasonIngressDenied},
		{"ICMP echo reply without a request: dropped", echo(fe, be, KindQueryReply, 1), false, ReasonNoConnection},
		{"ICMP unreachable that reached the queue: unrelated, dropped", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: 1}, Kind: KindError}, false, ReasonUnrelated},
		{"neighbour solicitation on the link: accepted", &Packet{Flow: policy.Flow{Src: be, Dst: netip.MustParseAddr("ff02::1:ff00:1"), Proto: 58}, Kind: KindND, ICMPType: 135, HopLimit: 255, LinkScope: true}, true, ReasonControl},
		{"neighbour solicitation routed (hop limit 64): judged, denied", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: 58}, Kind: KindND, ICMPType: 135, HopLimit: 64}, false, ReasonIngressDenied},
		{"non-first fragment accepted", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.UDP}, Kind: KindFragment}, true, ReasonFragment},
		{"malformed dropped", &Packet{Kind: KindMalformed}, false, ReasonMalformed},
	}
	c := NewFlowCache(128)
	tr := newReturnTable(128)
	for _, st := range steps {
		j := judge(s, st.p, c, tr, judgeRules{}, now)
		if j.Accept != st.want || j.Reason != st.cause {
			t.Errorf("%s: accept=%v reason=%v, want accept=%v reason=%v", st.name, j.Accept, j.Reason, st.want, st.cause)
		}
	}
	if j := judge(nil, pkt(be, fe, policy.TCP, 1, 2, tcpSYN), c, tr, judgeRules{failOpen: true}, now); !j.Accept || j.Reason != ReasonNoSnapshot {
		t.Errorf("no snapshot, fail-open: %+v, want accept", j)
	}
	if j := judge(nil, pkt(be, fe, policy.TCP, 1, 2, tcpSYN), c, tr, judgeRules{}, now); j.Accept || j.Reason != ReasonNoSnapshot {
		t.Errorf("no snapshot, fail-closed: %+v, want drop", j)
	}
}

// Echo requests open an exchange that only its replies (same identifier, reversed) may use.
func TestJudgeEchoReplies(t *testing.T) {
	s := compileTest(t, 1, `
---
apiVersion: v1
kind: Namespace
metadata: {name: open}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: open}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: open}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.20}
`)
	a, b := netip.MustParseAddr("10.244.2.10"), netip.MustParseAddr("10.244.2.20")
	q := func(src, dst netip.Addr, kind Kind, id uint16) *Packet {
		return &Packet{Flow: policy.Flow{Src: src, Dst: dst, Proto: 1}, Kind: kind, ID: id}
	}
	c, tr, now := NewFlowCache(64), newReturnTable(64), time.Now().UnixNano()
	for _, st := range []struct {
		name string
		p    *Packet
		want bool
	}{
		{"reply before any request", q(b, a, KindQueryReply, 7), false},
		{"request a->b", q(a, b, KindQuery, 7), true},
		{"its reply b->a", q(b, a, KindQueryReply, 7), true},
		{"a reply with another identifier", q(b, a, KindQueryReply, 8), false},
		// Same 5-tuple and direction as the accepted request: part of that exchange, to a peer
		// a may reach anyway.
		{"a reply-typed packet in the request's direction", q(a, b, KindQueryReply, 7), true},
	} {
		if j := judge(s, st.p, c, tr, judgeRules{}, now); j.Accept != st.want {
			t.Errorf("%s: %+v, want accept=%v", st.name, j, st.want)
		}
	}
}

func TestJudgeQueueAllCutAndKeep(t *testing.T) {
	s1 := compileTest(t, 1, "")
	// Generation 2 removes frontend's access to backend.
	s2 := compileTest(t, 2, `
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-egress-none, namespace: prod}
spec: {podSelector: {matchLabels: {tier: frontend}}, policyTypes: [Egress]}
`)
	now := time.Now().UnixNano()
	for _, cut := range []bool{false, true} {
		c, tr := NewFlowCache(128), newReturnTable(128)
		syn := pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN)
		if j := judge(s1, syn, c, tr, judgeRules{cut: cut}, now); !j.Accept {
			t.Fatalf("syn denied under s1")
		}
		data := pkt(fe, be, policy.TCP, 40000, 8080, tcpACK)
		if j := judge(s1, data, c, tr, judgeRules{cut: cut}, now); !j.Accept || j.Reason != ReasonTracked {
			t.Fatalf("data not tracked: %+v", j)
		}
		reply := pkt(be, fe, policy.TCP, 8080, 40000, tcpACK)
		if j := judge(s2, reply, c, tr, judgeRules{cut: cut}, now+1); j.Accept == cut {
			t.Errorf("cut=%v: reply after the policy change accept=%v", cut, j.Accept)
		}
		if j := judge(s2, data, c, tr, judgeRules{cut: cut}, now+2); j.Accept == cut {
			t.Errorf("cut=%v: data after the policy change accept=%v", cut, j.Accept)
		}
		if j := judge(s2, pkt(fe, be, policy.TCP, 40001, 8080, tcpSYN), c, tr, judgeRules{cut: cut}, now+3); j.Accept {
			t.Errorf("cut=%v: a new connection must be denied under s2", cut)
		}
	}
}

func TestFlowCache(t *testing.T) {
	s1 := compileTest(t, 1, "")
	s2 := compileTest(t, 2, "")
	c := NewFlowCache(2)
	var hits, misses int
	decide := func(s *policy.Snapshot, f policy.Flow) (policy.Verdict, bool) {
		v, hit := c.Decide(s, f)
		if hit {
			hits++
		} else {
			misses++
		}
		return v, hit
	}
	f := policy.Flow{Src: fe, Dst: be, Proto: policy.TCP, Port: 8080}
	if v, hit := decide(s1, f); hit || !v.Allowed {
		t.Fatalf("first: hit=%v v=%+v", hit, v)
	}
	if _, hit := decide(s1, f); !hit {
		t.Fatal("second lookup missed")
	}
	if _, hit := decide(s2, f); hit {
		t.Fatal("a new generation must miss")
	}
	if _, hit := decide(s2, f); !hit {
		t.Fatal("refreshed entry missed")
	}
	for p := uint16(1); p <= 3; p++ {
		decide(s2, policy.Flow{Src: fe, Dst: be, Proto: policy.TCP, Port: p})
	}
	if c.Len() != 2 {
		t.Fatalf("cache holds %d, size 2", c.Len())
	}
	if hits != 2 || misses != 5 {
		t.Fatalf("hits %d misses %d", hits, misses)
	}
}

// TestFlowCacheKeepsUnchangedFlows: after a patch, the flows whose ends the patch did not touch
// are still answered from the cache, and those it touched are decided again.
func TestFlowCacheKeepsUnchangedFlows(t *testing.T) {
	st, _, err := policy.Load(strings.NewReader(testState), "test")
	if err != nil {
		t.Fatal(err)
	}
	b := policy.NewBuilder(policy.Options{})
	for i := range st.Namespaces {
		b.SetNamespace(&st.Namespaces[i])
	}
	for i := range st.Policies {
		b.SetPolicy(&st.Policies[i])
	}
	var dnsPod *corev1.Pod
	for i := range st.Pods {
		b.SetPod(&st.Pods[i])
		if st.Pods[i].Name == "dns" {
			dnsPod = &st.Pods[i]
		}
	}
	s1, err := b.Build(1)
	if err != nil {
		t.Fatal(err)
	}
	c := NewFlowCache(16)
	toBackend := policy.Flow{Src: fe, Dst: be, Proto: policy.TCP, Port: 8080}
	toDNS := policy.Flow{Src: fe, Dst: dns, Proto: policy.UDP, Port: 53}
	for _, f := range []policy.Flow{toBackend, toDNS} {
		if v, hit := c.Decide(s1, f); hit || !v.Allowed {
			t.Fatalf("%v under s1: hit=%v %v, want a miss, allowed", f, hit, v)
		}
	}
	// The dns pod loses the label allow-dns selects it by: its port 53 falls under deny-all.
	relabelled := *dnsPod.DeepCopy()
	relabelled.Labels = map[string]string{"k8s-app": "other"}
	b.SetPod(&relabelled)
	s2, err := b.Build(2)
	if err != nil {
		t.Fatal(err)
	}
	if patched, _ := b.Builds(); patched != 1 {
		t.Fatalf("the relabel did not patch (%d patches); the test needs a patched snapshot", patched)
	}
	if v, hit := c.Decide(s2, toBackend); !hit || !v.Allowed {
		t.Fatalf("frontend -> backend under s2: hit=%v %v, want a hit, allowed: the patch did not touch either end", hit, v)
	}
	if c.revalidated != 1 {
		t.Fatalf("revalidated = %d, want 1", c.revalidated)
	}
	if v, hit := c.Decide(s2, toDNS); hit || v.Allowed {
		t.Fatalf("frontend -> dns under s2: hit=%v %v, want a miss, denied", hit, v)
	}
	// A full compile vouches for nothing.
	s3 := compileTest(t, 3, "")
	if _, hit := c.Decide(s3, toBackend); hit {
		t.Fatal("a compiled snapshot's first lookup hit an entry of another snapshot")
	}
}

func TestReturnTableTimeouts(t *testing.T) {
	tr := newReturnTable(16)
	now := time.Now().UnixNano()
	query := pkt(fe, dns, policy.UDP, 5353, 53, 0)
	answer := pkt(dns, fe, policy.UDP, 53, 5353, 0)
	if !tr.record(query, 1, now) {
		t.Fatal("record refused")
	}
	if e, reply := tr.lookup(answer, now+int64(time.Second)); e == nil || !reply {
		t.Fatalf("reply direction: entry %v reply %v", e, reply)
	}
	if e, reply := tr.lookup(query, now+int64(time.Second)); e == nil || reply {
		t.Fatalf("opening direction: entry %v reply %v", e, reply)
	} else if e.opening() != query.Flow {
		t.Fatalf("opening %+v, want %+v", e.opening(), query.Flow)
	}
	// Refreshed at +1s; still there just before +1s+idle.
	if e, _ := tr.lookup(query, now+int64(time.Second+trackIdleOther)-1); e == nil {
		t.Fatal("entry expired before its idle timeout")
	}
	if e, _ := tr.lookup(query, now+int64(3*time.Second+2*trackIdleOther)); e != nil {
		t.Fatal("entry outlived its idle timeout")
	}
	if tr.len() != 0 {
		t.Fatalf("expired entry left %d entries", tr.len())
	}
}

// One opener flooding new flows can neither hold more than its quota nor evict the connections
// of others that have seen a reply.
func TestReturnTableFloodKeepsOthers(t *testing.T) {
	tr := newReturnTable(1024) // 128 buckets of 8, quota 64
	now := time.Now().UnixNano()
	// Four other pods with 50 answered exchanges each.
	victims := make([]*Packet, 0, 200)
	for i := range 200 {
		src := netip.AddrFrom4([4]byte{10, 244, 9, byte(i % 4)})
		p := pkt(src, dns, policy.UDP, uint16(20000+i), 53, 0)
		if !tr.record(p, 1, now) {
			t.Fatalf("victim flow %d not recorded", i)
		}
		if e, reply := tr.lookup(pkt(dns, src, policy.UDP, 53, uint16(20000+i), 0), now); e == nil || !reply {
			t.Fatalf("victim flow %d: no reply entry", i)
		}
		victims = append(victims, p)
	}
	recorded := 0
	for i := range 50000 {
		flood := pkt(fe, dns, policy.UDP, uint16(i%60000+1), uint16(1000+i/60000), 0)
		if tr.record(flood, 1, now+int64(i)) {
			recorded++
		}
	}
	held := tr.owners[tr.ownerSlot(fe)]
	if held > tr.quota {
		t.Errorf("the flooder holds %d entries, quota %d", held, tr.quota)
	}
	if tr.stats.overQuota.Load() == 0 || recorded == 50000 {
		t.Errorf("quota never refused the flooder (recorded %d of 50000)", recorded)
	}
	lost := 0
	for _, p := range victims {
		if e, _ := tr.lookup(p, now+1); e == nil {
			lost++
		}
	}
	if lost != 0 {
		t.Errorf("%d of %d replied-to connections of another pod were evicted by the flood", lost, len(victims))
	}
}

func TestHotPathAllocatesNothing(t *testing.T) {
	s := compileTest(t, 1, "")
	d := NewDecoder()
	c := NewFlowCache(1024)
	tr := newReturnTable(1024)
	var p Packet
	syn := pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN)
	r := judgeRules{cut: true}
	judge(s, syn, c, tr, r, 1)
	f := syn.Flow
	if n := testing.AllocsPerRun(1000, func() { s.Decide(f) }); n != 0 {
		t.Errorf("Decide: %v allocs", n)
	}
	if n := testing.AllocsPerRun(1000, func() { c.Decide(s, f) }); n != 0 {
		t.Errorf("cache hit: %v allocs", n)
	}
	now := time.Now().UnixNano()
	if n := testing.AllocsPerRun(1000, func() { judge(s, syn, c, tr, r, now) }); n != 0 {
		t.Errorf("judge of a SYN: %v allocs", n)
	}
	ack := pkt(fe, be, policy.TCP, 40000, 8080, tcpACK)
	if n := testing.AllocsPerRun(1000, func() { judge(s, ack, c, tr, r, now) }); n != 0 {
		t.Errorf("tracked judge: %v allocs", n)
	}
	// Every connection a new 5-tuple (a new source port), recorded in the table.
	port := uint16(1000)
	if n := testing.AllocsPerRun(1000, func() {
		port++
		syn.SrcPort = port
		judge(s, syn, c, tr, r, now)
	}); n != 0 {
		t.Errorf("new connections: %v allocs", n)
	}
	data := decodeCases(t)[0].data
	if n := testing.AllocsPerRun(1000, func() { d.Decode(data, &p); judge(s, &p, c, tr, judgeRules{}, now) }); n != 0 {
		t.Errorf("decode+judge: %v allocs", n)
	}
}

// Every reason policy can give maps to the packet path's reason of the same name, explicitly:
// a Reason added to policy must be added here too, or this fails.
func TestReasonMapsEveryPolicyReason(t *testing.T) {
	known := 0
	for i := 0; i < 256; i++ {
		r := policy.Reason(i)
		if r.String() == "unknown" {
			continue
		}
		known++
		got := policyReason(r)
		if got == reasonUnmapped {
			t.Errorf("policy.Reason %d (%q) has no packet-path reason: add it to policyReason", i, r)
			continue
		}
		if got.String() != r.String() {
			t.Errorf("policy.Reason %q maps to %q", r, got)
		}
	}
	if known < 4 {
		t.Fatalf("only %d policy reasons found; the scan is broken", known)
	}
	seen := map[string]bool{}
	for r := Reason(0); r < numReasons; r++ {
		if n := r.String(); seen[n] || n == "" {
			t.Errorf("reason %d has a duplicate or empty name %q", r, n)
		} else {
			seen[n] = true
		}
	}
}

// A connection ends in the table as it ends on the wire: gone after a RST (which itself still
// passes), after a FIN within trackIdleClosing.
func TestJudgeConnectionEnds(t *testing.T) {
	s := compileTest(t, 1, "")
	c, tr := NewFlowCache(64), newReturnTable(64)
	now := time.Now().UnixNano()
	accept := func(p *Packet, at int64) bool { return judge(s, p, c, tr, judgeRules{}, at).Accept }
	if !accept(pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN), now) {
		t.Fatal("SYN denied")
	}
	if !accept(pkt(be, fe, policy.TCP, 8080, 40000, tcpRST|tcpACK), now) {
		t.Fatal("the RST of an accepted connection was dropped")
	}
	if accept(pkt(fe, be, policy.TCP, 40000, 8080, tcpACK), now) {
		t.Error("an ACK after the RST still passed: the connection outlived its reset")
	}
	if !accept(pkt(fe, be, policy.TCP, 40001, 8080, tcpSYN), now) || !accept(pkt(fe, be, policy.TCP, 40001, 8080, tcpFIN|tcpACK), now) {
		t.Fatal("second connection or its FIN dropped")
	}
	if !accept(pkt(be, fe, policy.TCP, 8080, 40001, tcpACK), now+int64(trackIdleClosing)/2) {
		t.Error("the last ACKs after a FIN were dropped")
	}
	if accept(pkt(be, fe, policy.TCP, 8080, 40001, tcpACK), now+int64(2*trackIdleClosing)) {
		t.Error("a closing connection outlived trackIdleClosing")
	}
}
