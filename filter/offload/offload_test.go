package offload

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/policy"
)

func TestOffloadRecordDoesNotAllocate(t *testing.T) {
	// Record touches only the queue and counters, so a kernel-less Offload measures it.
	o := &Offload{q: make(chan offloadItem, 8)}
	f := policy.Flow{Src: netip.MustParseAddr("10.244.0.2"), Dst: netip.MustParseAddr("10.244.1.2"), Proto: policy.TCP, Port: 80}
	allocs := testing.AllocsPerRun(1000, func() { o.Record(1, f, true) })
	if allocs != 0 {
		t.Fatalf("Record allocates %.1f times per call; the packet path must not allocate", allocs)
	}
	st := o.stats()
	if st.Recorded != 8 || st.Dropped == 0 {
		t.Fatalf("a full queue must drop and count: %+v", st)
	}
	o.Record(1, policy.Flow{Src: f.Src, Dst: f.Dst, Proto: 1}, true)
	if o.stats().Skipped != 1 {
		t.Fatalf("ICMP must not be offloaded: %+v", o.stats())
	}
}

// miniLab is the smallest routed lab that exercises the sets: a node namespace forwarding
// between two pod namespaces. It lives here (not in internal/netlab) so the filter package's
// test does not depend on the lab helper's evolution.
type miniLab struct {
	node, a, b string
	aIP, bIP   netip.Addr
}

func sh(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces, iptables and ipset")
	}
	for _, b := range []string{"ip", "iptables", "ipset"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("needs %s (hack/deps.sh installs it)", b)
		}
	}
}

func newMiniLab(t *testing.T) *miniLab {
	t.Helper()
	tag := fmt.Sprintf("%d%d", os.Getpid()%100000, time.Now().UnixNano()%1000)
	l := &miniLab{node: "slo-n" + tag, a: "slo-a" + tag, b: "slo-b" + tag,
		aIP: netip.MustParseAddr("10.244.0.2"), bIP: netip.MustParseAddr("10.244.1.2")}
	t.Cleanup(func() {
		for _, ns := range []string{l.a, l.b, l.node} {
			exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	for _, ns := range []string{l.node, l.a, l.b} {
		sh(t, "ip", "netns", "add", ns)
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	sh(t, "ip", "netns", "exec", l.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	for i, p := range []struct {
		ns string
		ip netip.Addr
	}{{l.a, l.aIP}, {l.b, l.bIP}} {
		host := fmt.Sprintf("veth%d", i)
		sh(t, "ip", "-n", l.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.ns)
		sh(t, "ip", "-n", l.node, "addr", "add", "169.254.1.1/32", "dev", host)
		sh(t, "ip", "-n", l.node, "link", "set", host, "up")
		sh(t, "ip", "-n", l.node, "route", "add", p.ip.String()+"/32", "dev", host)
		sh(t, "ip", "-n", p.ns, "addr", "add", p.ip.String()+"/32", "dev", "eth0")
		sh(t, "ip", "-n", p.ns, "link", "set", "eth0", "up")
		sh(t, "ip", "-n", p.ns, "route", "add", "169.254.1.1", "dev", "eth0")
		sh(t, "ip", "-n", p.ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
	}
	return l
}

// inNetns runs fn on an OS thread moved into namespace ns. The thread is never unlocked, so the
// runtime discards it afterwards instead of reusing a thread in the wrong namespace.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// flowOf reads the flow key of an IPv4 TCP/UDP packet.
func flowOf(p []byte) (policy.Flow, bool) {
	if len(p) < 20 || p[0]>>4 != 4 {
		return policy.Flow{}, false
	}
	ihl := int(p[0]&0x0f) * 4
	if len(p) < ihl+4 {
		return policy.Flow{}, false
	}
	return policy.Flow{
		Src:   netip.AddrFrom4([4]byte(p[12:16])),
		Dst:   netip.AddrFrom4([4]byte(p[16:20])),
		Proto: policy.Protocol(p[9]),
		Port:  binary.BigEndian.Uint16(p[ihl+2 : ihl+4]),
	}, true
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after 5s waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestOffloadRealPackets(t *testing.T) {
	needRoot(t)
	l := newMiniLab(t)

	var o *Offload
	if err := inNetns(l.node, func() (err error) {
		o, err = New("slo-test", 30*time.Second, nil)
		return err
	}); err != nil {
		t.Fatalf("New in the node namespace: %v", err)
	}
	const queueNum = 7
	s := o.Sets()
	ipt := func(args ...string) { sh(t, append([]string{"ip", "netns", "exec", l.node, "iptables"}, args...)...) }
	ipt("-A", "FORWARD", "-m", "set", "--match-set", s.Allow4, "src,dst,dst", "-j", "ACCEPT")
	ipt("-A", "FORWARD", "-m", "set", "--match-set", s.Deny4, "src,dst,dst", "-j", "DROP")
	ipt("-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(queueNum))
	t.Cleanup(func() {
		// Rules first, then the sets: the kernel refuses to destroy a referenced set.
		exec.Command("ip", "netns", "exec", l.node, "iptables", "-F", "FORWARD").Run()
		if err := o.Close(); err != nil {
			t.Errorf("Close after removing the rules: %v", err)
		}
	})

	// The snapshots come from a Builder over the lab's two pods and a third one elsewhere,
	// whose changes touch neither end of the lab's flows.
	pods := policy.NewBuilder(policy.Options{})
	pods.SetNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "lab"}})
	setPod := func(name string, ip netip.Addr, app string) {
		pods.SetPod(&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "lab", Name: name, Labels: map[string]string{"app": app}},
			Spec:       corev1.PodSpec{NodeName: "n"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String(), PodIPs: []corev1.PodIP{{IP: ip.String()}}},
		})
	}
	setPod("a", l.aIP, "a")
	setPod("b", l.bIP, "b")
	setPod("c", netip.MustParseAddr("10.244.2.2"), "c")
	var cur atomic.Pointer[policy.Snapshot]
	gen := uint64(0)
	publish := func(what string) *policy.Snapshot {
		t.Helper()
		gen++
		s, err := pods.Build(gen)
		if err != nil {
			t.Fatal(err)
		}
		if patched, _ := pods.Builds(); gen > 1 && patched != int(gen-1) {
			t.Fatalf("%s: the Builder compiled everything; the test needs a patched snapshot", what)
		}
		cur.Store(s)
		if err := o.Publish(s); err != nil {
			t.Fatalf("%s: Publish: %v", what, err)
		}
		return s
	}
	publish("the first snapshot")

	// The queue reader plays the agent: port 8080 is allowed, 8081 denied; every verdict is
	// recorded for offload.
	nsh, err := netns.GetFromName(l.node)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	q, err := nfqueue.Open(&nfqueue.Config{NetNS: int(nsh), NfQueue: queueNum, MaxPacketLen: 128,
		Copymode: nfqueue.NfQnlCopyPacket, WriteTimeout: time.Second})
	if err != nil {
		t.Fatalf("open NFQUEUE %d in the node namespace: %v", queueNum, err)
	}
	defer q.Close()
	var queued atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err = q.RegisterWithErrorFunc(ctx, func(a nfqueue.Attribute) int {
		queued.Add(1)
		verdict := nfqueue.NfAccept
		if a.Payload != nil {
			if f, ok := flowOf(*a.Payload); ok {
				allowed := f.Port != 8081
				if !allowed {
					verdict = nfqueue.NfDrop
				}
				o.Record(cur.Load().Serial(), f, allowed)
			}
		}
		q.SetVerdict(*a.PacketID, verdict)
		return 0
	}, func(error) int { return 0 })
	if err != nil {
		t.Fatal(err)
	}

	// Server in pod b on both ports; it only accepts and closes.
	for _, port := range []int{8080, 8081} {
		var ln net.Listener
		if err := inNetns(l.b, func() (err error) {
			ln, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", l.bIP, port))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	dial := func(port int, timeout time.Duration) error {
		return inNetns(l.a, func() error {
			c, err := net.DialTimeout("tcp4", fmt.Sprintf("%s:%d", l.bIP, port), timeout)
			if err != nil {
				return err
			}
			return c.Close()
		})
	}
	has := func(set string, port uint16) bool {
		e := &netlink.IPSetEntry{IP: l.aIP.AsSlice(), IP2: l.bIP.AsSlice(), Port: &port}
		ok, err := o.h.IpsetTest(set, e)
		if err != nil {
			t.Fatalf("ipset test %s: %v", set, err)
		}
		return ok
	}

	if err := dial(8080, 3*time.Second); err != nil {
		t.Fatalf("first connection through the queue: %v", err)
	}
	first := queued.Load()
	if first == 0 {
		t.Fatal("the first connection never reached the queue; the NFQUEUE rule is not in the path")
	}
	waitFor(t, "the allowed flow to appear in "+s.Allow4, func() bool { return has(s.Allow4, 8080) })
	for i := 0; i < 5; i++ {
		if err := dial(8080, 3*time.Second); err != nil {
			t.Fatalf("repeat connection %d: %v", i, err)
		}
	}
	if n := queued.Load(); n != first {
		t.Fatalf("repeat connections between the same endpoints reached the queue (%d packets, want %d): the allow set did not take them", n, first)
	}

	// Denied flow: the first SYN is dropped by the reader and recorded; retransmissions and new
	// attempts are then dropped in the kernel without reaching the queue.
	if err := dial(8081, 300*time.Millisecond); err == nil {
		t.Fatal("connection to the denied port succeeded")
	}
	waitFor(t, "the denied flow to appear in "+s.Deny4, func() bool { return has(s.Deny4, 8081) })
	before := queued.Load()
	if err := dial(8081, 1500*time.Millisecond); err == nil {
		t.Fatal("connection to the denied port succeeded after offload")
	}
	if n := queued.Load(); n != before {
		t.Fatalf("a denied repeat flow reached the queue (%d packets, want %d)", n, before)
	}
	if has(s.Allow4, 8081) {
		t.Fatal("denied flow is in the allow set")
	}

	// A change elsewhere (pod c) keeps both entries: repeat connections stay in the kernel.
	flushes := o.stats().Flushes
	setPod("c", netip.MustParseAddr("10.244.2.2"), "c2")
	publish("relabel pod c")
	if !has(s.Allow4, 8080) || !has(s.Deny4, 8081) {
		t.Fatal("a change that touched neither end of the flows removed their entries")
	}
	before = queued.Load()
	if err := dial(8080, 3*time.Second); err != nil {
		t.Fatalf("connection after an unrelated change: %v", err)
	}
	if n := queued.Load(); n != before {
		t.Fatalf("after an unrelated change a repeat connection reached the queue (%d packets, want %d)", n, before)
	}
	if st := o.stats(); st.Flushes != flushes || st.Deleted != 0 {
		t.Fatalf("an unrelated change flushed or deleted: %+v", st)
	}

	// A change of pod b deletes the entries with b at an end, and only by deleting them.
	setPod("b", l.bIP, "b2")
	publish("relabel pod b")
	if has(s.Allow4, 8080) || has(s.Deny4, 8081) {
		t.Fatal("entries of a changed pod survived Publish")
	}
	if st := o.stats(); st.Flushes != flushes || st.Deleted != 2 {
		t.Fatalf("want the two entries deleted and no flush: %+v", st)
	}
	before = queued.Load()
	if err := dial(8080, 3*time.Second); err != nil {
		t.Fatalf("connection after the change: %v", err)
	}
	if queued.Load() == before {
		t.Fatal("after the change the connection did not reach the queue: a stale verdict survived")
	}
	waitFor(t, "the flow to be offloaded again", func() bool { return has(s.Allow4, 8080) })
	// Pod a's list still holds the entries deleted through b: deleting them again is no error.
	setPod("a", l.aIP, "a2")
	publish("relabel pod a")
	if has(s.Allow4, 8080) {
		t.Fatal("the entry of a changed pod survived Publish")
	}
	if st := o.stats(); st.Flushes != flushes || st.Deleted != 3 {
		t.Fatalf("want one more entry deleted and no flush: %+v", st)
	}
	if err := dial(8080, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the flow to be offloaded again", func() bool { return has(s.Allow4, 8080) })

	// A verdict in flight lands only if the snapshot in force by then vouches for it.
	s3 := cur.Load()
	setPod("c", netip.MustParseAddr("10.244.2.2"), "c")
	publish("relabel pod c again")
	o.Record(s3.Serial(), policy.Flow{Src: l.aIP, Dst: l.bIP, Proto: policy.TCP, Port: 9997}, true)
	waitFor(t, "a verdict the new snapshot vouches for to land", func() bool { return has(s.Allow4, 9997) })
	setPod("b", l.bIP, "b")
	publish("relabel pod b again")
	o.Record(s3.Serial(), policy.Flow{Src: l.aIP, Dst: l.bIP, Proto: policy.TCP, Port: 9999}, true)
	o.Record(cur.Load().Serial(), policy.Flow{Src: l.aIP, Dst: l.bIP, Proto: policy.TCP, Port: 9998}, true)
	waitFor(t, "the current snapshot's verdict to land", func() bool { return has(s.Allow4, 9998) })
	if has(s.Allow4, 9999) {
		t.Fatal("a verdict of an older snapshot was written after a change that touched its flow")
	}
	if st := o.stats(); st.Stale == 0 || st.Errors != 0 {
		t.Fatalf("stats: %+v", st)
	}

	// A snapshot that cannot tell what changed (a full compile) flushes.
	compiled, err := policy.Compile(pods.State(), policy.Options{Generation: gen + 1})
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(compiled)
	if err := o.Publish(compiled); err != nil {
		t.Fatal(err)
	}
	if o.stats().Flushes != flushes+1 {
		t.Fatalf("a full compile did not flush: %+v", o.stats())
	}
	if has(s.Allow4, 8080) || has(s.Allow4, 9998) || has(s.Deny4, 8081) {
		t.Fatal("entries survived the flush")
	}
}

// The packet path takes the offload through its FlowRecorder interface.
var _ filter.FlowRecorder = (*Offload)(nil)
