package filter

import (
	"net/netip"
	"strings"
	"testing"
	"time"

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
		track bool
		want  bool
		cause Reason
	}
	steps := []step{
		{"frontend->backend:8080 SYN allowed by rule", pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN), false, true, ReasonRule},
		{"backend->frontend:40000 SYN denied (frontend isolated)", pkt(be, fe, policy.TCP, 8080, 40000, tcpSYN), false, false, ReasonIngressDenied},
		{"backend:8080->frontend ACK after conntrack flush: reply of an allowed flow", pkt(be, fe, policy.TCP, 8080, 40000, tcpACK), false, true, ReasonReply},
		{"backend:8080->frontend SYN-ACK: reply", pkt(be, fe, policy.TCP, 8080, 40000, tcpSYN|tcpACK), false, true, ReasonReply},
		{"backend:9999->frontend ACK: not a reply of anything allowed", pkt(be, fe, policy.TCP, 9999, 40000, tcpACK), false, false, ReasonIngressDenied},
		{"frontend->backend:9090 denied", pkt(fe, be, policy.TCP, 40000, 9090, tcpSYN), false, false, ReasonIngressDenied},
		{"dns:53->frontend UDP before any query: denied", pkt(dns, fe, policy.UDP, 53, 5353, 0), true, false, ReasonIngressDenied},
		{"frontend->dns:53 UDP query allowed", pkt(fe, dns, policy.UDP, 5353, 53, 0), true, true, ReasonRule},
		{"dns:53->frontend:5353 UDP answer: tracked", pkt(dns, fe, policy.UDP, 53, 5353, 0), true, true, ReasonTracked},
		{"dns:53->frontend:5354 UDP to another port: denied", pkt(dns, fe, policy.UDP, 53, 5354, 0), true, false, ReasonIngressDenied},
		{"frontend->backend SCTP INIT allowed", &Packet{Flow: policy.Flow{Src: fe, Dst: be, Proto: policy.SCTP, Port: 3868}, SrcPort: 7, Kind: KindPorts, SCTPChunk: sctpInit}, false, true, ReasonRule},
		{"backend->frontend SCTP DATA: reply", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.SCTP, Port: 7}, SrcPort: 3868, Kind: KindPorts}, false, true, ReasonReply},
		{"backend->frontend SCTP INIT: denied", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.SCTP, Port: 7}, SrcPort: 3868, Kind: KindPorts, SCTPChunk: sctpInit}, false, false, ReasonIngressDenied},
		{"ICMP echo to isolated pod denied", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: 1}, Kind: KindQuery}, false, false, ReasonIngressDenied},
		{"ICMP unreachable never blocked", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: 1}, Kind: KindControl}, false, true, ReasonControl},
		{"non-first fragment accepted", &Packet{Flow: policy.Flow{Src: be, Dst: fe, Proto: policy.UDP}, Kind: KindFragment}, false, true, ReasonFragment},
		{"malformed dropped", &Packet{Kind: KindMalformed}, false, false, ReasonMalformed},
	}
	c := NewFlowCache(128)
	tr := newReturnTable(128)
	for _, st := range steps {
		var track *returnTable
		if st.track {
			track = tr
		}
		j := judge(s, st.p, c, track, false, now)
		if j.Accept != st.want || j.Reason != st.cause {
			t.Errorf("%s: accept=%v reason=%v, want accept=%v reason=%v", st.name, j.Accept, j.Reason, st.want, st.cause)
		}
	}
	if j := judge(nil, pkt(be, fe, policy.TCP, 1, 2, tcpSYN), c, nil, false, now); !j.Accept || j.Reason != ReasonNoSnapshot {
		t.Errorf("no snapshot: %+v, want accept", j)
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
		if j := judge(s1, syn, c, tr, cut, now); !j.Accept {
			t.Fatalf("syn denied under s1")
		}
		data := pkt(fe, be, policy.TCP, 40000, 8080, tcpACK)
		if j := judge(s1, data, c, tr, cut, now); !j.Accept || j.Reason != ReasonTracked {
			t.Fatalf("data not tracked: %+v", j)
		}
		reply := pkt(be, fe, policy.TCP, 8080, 40000, tcpACK)
		if j := judge(s2, reply, c, tr, cut, now+1); j.Accept == cut {
			t.Errorf("cut=%v: reply after the policy change accept=%v", cut, j.Accept)
		}
		if j := judge(s2, data, c, tr, cut, now+2); j.Accept == cut {
			t.Errorf("cut=%v: data after the policy change accept=%v", cut, j.Accept)
		}
		if j := judge(s2, pkt(fe, be, policy.TCP, 40001, 8080, tcpSYN), c, tr, cut, now+3); j.Accept {
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

func TestReturnTableTimeouts(t *testing.T) {
	tr := newReturnTable(16)
	now := time.Now().UnixNano()
	k := tuple{Src: fe, Dst: dns, Proto: policy.UDP, SrcPort: 5353, DstPort: 53}
	tr.Record(k, policy.Flow{Src: fe, Dst: dns, Proto: policy.UDP, Port: 53}, 1, now)
	if _, ok := tr.Lookup(k.reverse(), now+int64(time.Second)); !ok {
		t.Fatal("reply direction missing")
	}
	// Refreshed at +1s; still there just before +1s+idle.
	if _, ok := tr.Lookup(k, now+int64(time.Second+trackIdleOther)-1); !ok {
		t.Fatal("entry expired before its idle timeout")
	}
	if _, ok := tr.Lookup(k, now+int64(3*time.Second+2*trackIdleOther)); ok {
		t.Fatal("entry outlived its idle timeout")
	}
	if tr.Len() != 0 {
		t.Fatalf("expired entry left %d directions", tr.Len())
	}
}

func TestHotPathAllocatesNothing(t *testing.T) {
	s := compileTest(t, 1, "")
	d := NewDecoder()
	c := NewFlowCache(1024)
	tr := newReturnTable(1024)
	var p Packet
	syn := pkt(fe, be, policy.TCP, 40000, 8080, tcpSYN)
	judge(s, syn, c, tr, true, 1)
	f := syn.Flow
	if n := testing.AllocsPerRun(1000, func() { s.Decide(f) }); n != 0 {
		t.Errorf("Decide: %v allocs", n)
	}
	if n := testing.AllocsPerRun(1000, func() { c.Decide(s, f) }); n != 0 {
		t.Errorf("cache hit: %v allocs", n)
	}
	now := time.Now().UnixNano()
	if n := testing.AllocsPerRun(1000, func() { judge(s, syn, c, tr, true, now) }); n != 0 {
		t.Errorf("tracked judge: %v allocs", n)
	}
	data := decodeCases(t)[0].data
	if n := testing.AllocsPerRun(1000, func() { d.Decode(data, &p); judge(s, &p, c, nil, false, now) }); n != 0 {
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
