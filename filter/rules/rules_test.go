package rules

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/vishvananda/netns"

	"github.com/sluice-dev/sluice/filter/offload"
	"github.com/sluice-dev/sluice/filter/queue"
	"github.com/sluice-dev/sluice/internal/netlab"
)

// Every test here runs its rules inside a netlab node namespace, never in the machine's own.

var (
	rA4 = netip.MustParseAddr("10.244.1.2")
	rA6 = netip.MustParseAddr("fd00:244::1:2")
	rB4 = netip.MustParseAddr("10.244.2.2")
	rB6 = netip.MustParseAddr("fd00:244::2:2")
	rC4 = netip.MustParseAddr("10.244.3.2")
	rD4 = netip.MustParseAddr("10.244.4.2")
	rN4 = netip.MustParseAddr("10.250.0.1") // the node's own address
)

const (
	passTimeout = 3 * time.Second
	dropTimeout = 1500 * time.Millisecond
)

type rulesLab struct {
	*netlab.Lab
	a, b, c, d *netlab.Host
}

func newRulesLab(t *testing.T) *rulesLab {
	t.Helper()
	l := netlab.NewT(t)
	rl := &rulesLab{Lab: l}
	var err error
	add := func(name string, ips ...netip.Addr) *netlab.Host {
		h, e := l.AddHost(name, ips...)
		if e != nil && err == nil {
			err = e
		}
		if e == nil {
			if e := h.ServeAll([]netlab.Proto{netlab.TCP, netlab.UDP}, 80); e != nil && err == nil {
				err = e
			}
		}
		return h
	}
	rl.a = add("a", rA4, rA6)
	rl.b = add("b", rB4, rB6)
	rl.c = add("c", rC4)
	rl.d = add("d", rD4)
	if err == nil {
		err = l.AddNodeAddr(rN4)
	}
	if err == nil {
		err = l.Node().ServeAll([]netlab.Proto{netlab.TCP, netlab.UDP}, 80)
	}
	if err != nil {
		t.Fatal(err)
	}
	return rl
}

func (rl *rulesLab) install(t *testing.T, cfg Config) *Rules {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	var r *Rules
	if err := rl.Node().Do(func() (err error) {
		r, err = Install(cfg)
		return err
	}); err != nil {
		t.Fatalf("Install: %v", err)
	}
	t.Cleanup(func() { rl.Node().Do(r.Remove) })
	return r
}

func (rl *rulesLab) expect(t *testing.T, from *netlab.Host, to netip.Addr, p netlab.Proto, want bool) {
	t.Helper()
	timeout := dropTimeout
	if want {
		timeout = passTimeout
	}
	got, err := rl.Probe(from, to, p, 80, timeout)
	if err != nil {
		t.Fatalf("probe %s -> %s %v/80: %v", from.Name, to, p, err)
	}
	if got != want {
		t.Errorf("probe %s -> %s %v/80: got through = %v, want %v", from.Name, to, p, got, want)
	}
}

// save returns the filter table of both families as the given backend shows it.
func (rl *rulesLab) save(t *testing.T, backend string) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range families(backend) {
		out, err := rl.NodeExec(fam.save, "-t", "filter")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			if !strings.HasPrefix(line, "#") { // the header carries a timestamp
				b.WriteString(countersRE.ReplaceAllString(line, "[0:0]") + "\n")
			}
		}
	}
	return b.String()
}

var countersRE = regexp.MustCompile(`\[\d+:\d+\]`)

func countLines(s, prefix string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			n++
		}
	}
	return n
}

func TestRulesInstallTwiceRemove(t *testing.T) {
	for _, backend := range []string{BackendNFT, BackendLegacy} {
		t.Run(backend, func(t *testing.T) {
			rl := newRulesLab(t)
			cfg := Config{Queues: queue.Spec{First: 7, Count: 2, FailOpen: true}, JudgeNode: true,
				LocalPods: []netip.Addr{rB4, rB6}, Backend: backend}
			r := rl.install(t, cfg)
			if r.Backend() != backend {
				t.Errorf("Backend() = %q, want %q", r.Backend(), backend)
			}
			first := rl.save(t, backend)
			for _, j := range []string{"-A FORWARD -j SLUICE-FORWARD", "-A INPUT -j SLUICE-INPUT", "-A OUTPUT -j SLUICE-OUTPUT"} {
				if n := countLines(first, j); n != 2 { // once per family
					t.Errorf("%q appears %d times, want 2 (IPv4 and IPv6):\n%s", j, n, first)
				}
			}
			if n := countLines(first, `-A SLUICE-QUEUE -m comment --comment "sluice:queue" -j NFQUEUE --queue-balance 7:8 --queue-bypass`); n != 2 {
				t.Errorf("NFQUEUE rule with balance 7:8 and bypass appears %d times, want 2:\n%s", n, first)
			}
			// New-only: what conntrack holds skips the queue; NEW, INVALID and UNTRACKED do not.
			if !strings.Contains(first, "--match-set sluice-local6 dst") || !strings.Contains(first, "--ctstate RELATED,ESTABLISHED -j RETURN") {
				t.Errorf("IPv6 set match or NEW-only match missing:\n%s", first)
			}
			if strings.Contains(first, "UNTRACKED") || strings.Contains(first, "INVALID") || strings.Contains(first, "! --ctstate NEW") {
				t.Errorf("untracked or invalid packets skip the queue:\n%s", first)
			}

			rl.install(t, cfg) // a restart, or a second agent on the same node
			if second := rl.save(t, backend); second != first {
				t.Errorf("second install changed the rules:\nfirst:\n%s\nsecond:\n%s", first, second)
			}
			sets, err := rl.NodeExec("ipset", "list", LocalSet4)
			if err != nil || !strings.Contains(sets, rB4.String()) || strings.Contains(sets, rA4.String()) {
				t.Errorf("%s should hold exactly %v (%v):\n%s", LocalSet4, rB4, err, sets)
			}

			if err := rl.Node().Do(r.Remove); err != nil {
				t.Fatal(err)
			}
			if after := rl.save(t, backend); strings.Contains(after, "SLUICE") {
				t.Errorf("rules remain after Remove:\n%s", after)
			}
			if out, _ := rl.NodeExec("ipset", "list", "-n"); strings.Contains(out, "sluice-") {
				t.Errorf("sets remain after Remove: %s", out)
			}
		})
	}
}

func TestCleanupAfterCrash(t *testing.T) {
	rl := newRulesLab(t)
	for _, backend := range []string{BackendNFT, BackendLegacy} {
		rl.install(t, Config{Queues: queue.Spec{First: 3, Count: 1}, LocalPods: []netip.Addr{rB4}, Backend: backend})
	}
	// A crash of an older version could leave a duplicate jump and an offload set behind.
	if _, err := rl.NodeExec("iptables-nft", "-A", "FORWARD", "-j", ChainForward); err != nil {
		t.Fatal(err)
	}
	if _, err := rl.NodeExec("ipset", "create", "sluice-allow4", "hash:ip,port,ip", "timeout", "30"); err != nil {
		t.Fatal(err)
	}
	// Someone else's rule and set in the same namespace must survive.
	if _, err := rl.NodeExec("iptables-nft", "-A", "FORWARD", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	if _, err := rl.NodeExec("ipset", "create", "other-set", "hash:ip"); err != nil {
		t.Fatal(err)
	}
	if err := rl.Node().Do(func() error { return Cleanup(slog.New(slog.DiscardHandler), "") }); err != nil {
		t.Fatal(err)
	}
	for _, backend := range []string{BackendNFT, BackendLegacy} {
		if after := rl.save(t, backend); strings.Contains(after, "SLUICE") {
			t.Errorf("%s: sluice rules remain after Cleanup:\n%s", backend, after)
		}
	}
	if !strings.Contains(rl.save(t, BackendNFT), "--dport 9 -j ACCEPT") {
		t.Error("Cleanup removed a rule that is not sluice's")
	}
	out, _ := rl.NodeExec("ipset", "list", "-n")
	if strings.Contains(out, "sluice-") || !strings.Contains(out, "other-set") {
		t.Errorf("after Cleanup want only other-set, have: %s", out)
	}
	// Nothing left: a second run is a no-op.
	if err := rl.Node().Do(func() error { return Cleanup(slog.New(slog.DiscardHandler), "") }); err != nil {
		t.Errorf("Cleanup with nothing installed: %v", err)
	}
}

// acceptLoop plays a trivial agent: it accepts every queued packet and counts them.
func acceptLoop(t *testing.T, rl *rulesLab, queueNum uint16) *atomic.Int64 {
	t.Helper()
	nsh, err := netns.GetFromName(rl.Node().Netns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	q, err := nfqueue.Open(&nfqueue.Config{NetNS: int(nsh), NfQueue: queueNum, MaxPacketLen: 128,
		MaxQueueLen: 1024, Copymode: nfqueue.NfQnlCopyPacket, WriteTimeout: time.Second})
	if err != nil {
		t.Fatalf("open NFQUEUE %d in the node namespace: %v", queueNum, err)
	}
	var n atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); q.Close() })
	err = q.RegisterWithErrorFunc(ctx, func(a nfqueue.Attribute) int {
		n.Add(1)
		q.SetVerdict(*a.PacketID, nfqueue.NfAccept)
		return 0
	}, func(e error) int {
		if ctx.Err() != nil {
			return 1
		}
		return 0
	})
	if err != nil {
		t.Fatal(err)
	}
	return &n
}

func TestRulesQueueRealConnections(t *testing.T) {
	rl := newRulesLab(t)
	rl.install(t, Config{Queues: queue.Spec{First: 11, Count: 1}, LocalPods: []netip.Addr{rB4, rB6}})
	queued := acceptLoop(t, rl, 11)

	// Fail-closed and a reader: connections to the local pod pass only through the reader.
	const conns = 5
	for i := 0; i < conns; i++ {
		rl.expect(t, rl.a, rB4, netlab.TCP, true)
	}
	n := queued.Load()
	// NEW-only: one queued packet per connection (a retransmitted SYN at most doubles it), while
	// each connection has at least 6 packets.
	if n < conns || n > 2*conns {
		t.Errorf("%d TCP connections queued %d packets, want %d..%d (only the SYN of each)", conns, n, conns, 2*conns)
	}
	rl.expect(t, rl.a, rB6, netlab.TCP, true)
	rl.expect(t, rl.b, rA4, netlab.UDP, true) // local pod as the source
	if queued.Load() < n+2 {
		t.Errorf("IPv6 TCP and UDP from the local pod were not queued (%d -> %d)", n, queued.Load())
	}
	// Two pods that are not local: never queued.
	before := queued.Load()
	rl.expect(t, rl.c, rD4, netlab.TCP, true)
	if queued.Load() != before {
		t.Errorf("traffic between non-local pods was queued")
	}
}

func TestRulesQueueAll(t *testing.T) {
	rl := newRulesLab(t)
	rl.install(t, Config{Queues: queue.Spec{First: 12, Count: 1}, QueueAll: true, LocalPods: []netip.Addr{rB4}})
	queued := acceptLoop(t, rl, 12)
	rl.expect(t, rl.a, rB4, netlab.TCP, true)
	// SYN, SYN-ACK, ACK, data, echo, ... all queued in both directions.
	if n := queued.Load(); n < 4 {
		t.Errorf("queue-all: one TCP connection queued %d packets, want >= 4", n)
	}
}

func TestRulesWithoutReader(t *testing.T) {
	rl := newRulesLab(t)
	t.Run("fail-open", func(t *testing.T) {
		r := rl.install(t, Config{Queues: queue.Spec{First: 21, Count: 1, FailOpen: true}, LocalPods: []netip.Addr{rB4, rB6}})
		for _, p := range []netlab.Proto{netlab.TCP, netlab.UDP} {
			rl.expect(t, rl.a, rB4, p, true)
			rl.expect(t, rl.a, rB6, p, true)
		}
		rl.Node().Do(r.Remove)
	})
	t.Run("fail-closed", func(t *testing.T) {
		r := rl.install(t, Config{Queues: queue.Spec{First: 22, Count: 1}, LocalPods: []netip.Addr{rB4, rB6}})
		for _, p := range []netlab.Proto{netlab.TCP, netlab.UDP} {
			rl.expect(t, rl.a, rB4, p, false)
			rl.expect(t, rl.a, rB6, p, false)
			rl.expect(t, rl.b, rA4, p, false) // egress of the local pod
		}
		rl.expect(t, rl.b, rN4, netlab.TCP, false) // local pod -> node address (INPUT)
		rl.expect(t, rl.a, rN4, netlab.TCP, true)  // a is not local
		// The node's own traffic to local pods is accepted unless JudgeNode.
		rl.expect(t, rl.Node(), rB4, netlab.TCP, true)
		rl.expect(t, rl.c, rD4, netlab.TCP, true)

		// b stops being local: its traffic is no longer judged.
		if err := rl.Node().Do(func() error { return r.UpdateLocalPods([]netip.Addr{rC4}) }); err != nil {
			t.Fatal(err)
		}
		rl.expect(t, rl.a, rB4, netlab.TCP, true)
		rl.expect(t, rl.d, rC4, netlab.TCP, false)
		rl.Node().Do(r.Remove)
	})
	t.Run("judge-node", func(t *testing.T) {
		r := rl.install(t, Config{Queues: queue.Spec{First: 23, Count: 1}, JudgeNode: true, LocalPods: []netip.Addr{rB4}})
		rl.expect(t, rl.Node(), rB4, netlab.TCP, false)
		rl.Node().Do(r.Remove)
	})
	t.Run("offload-sets", func(t *testing.T) {
		sets := &offload.Sets{Allow4: "sluice-t-allow4", Deny4: "sluice-t-deny4"}
		for _, s := range []string{sets.Allow4, sets.Deny4} {
			if _, err := rl.NodeExec("ipset", "create", s, "hash:ip,port,ip", "timeout", "60"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { rl.NodeExec("ipset", "destroy", s) })
		}
		// Fail-open without a reader would pass everything; the deny set must still drop, and
		// fail-closed the allow set must still pass.
		rl.NodeExec("ipset", "add", sets.Deny4, fmt.Sprintf("%s,tcp:80,%s", rA4, rB4))
		rl.NodeExec("ipset", "add", sets.Allow4, fmt.Sprintf("%s,udp:80,%s", rA4, rB4))
		r := rl.install(t, Config{Queues: queue.Spec{First: 24, Count: 1, FailOpen: true}, Offload: sets, LocalPods: []netip.Addr{rB4}})
		rl.expect(t, rl.a, rB4, netlab.TCP, false)
		rl.expect(t, rl.a, rB4, netlab.UDP, true)
		rl.Node().Do(r.Remove)
		r = rl.install(t, Config{Queues: queue.Spec{First: 25, Count: 1}, Offload: sets, LocalPods: []netip.Addr{rB4}})
		rl.expect(t, rl.a, rB4, netlab.UDP, true)
		rl.expect(t, rl.b, rA4, netlab.UDP, false) // not in the allow set: to the (absent) reader
		rl.Node().Do(r.Remove)
	})
}

func TestDetectBackendInFreshNamespace(t *testing.T) {
	rl := newRulesLab(t)
	detect := func() Backend {
		t.Helper()
		var be Backend
		if err := rl.Node().Do(func() (err error) { be, err = DetectBackend(); return err }); err != nil {
			t.Fatal(err)
		}
		return be
	}
	if be := detect(); be.Name != BackendNFT {
		t.Errorf("fresh namespace: backend %s (%s), want %s", be.Name, be.Why, BackendNFT)
	}
	// A node whose other components use legacy rules gets legacy rules from sluice too.
	if _, err := rl.NodeExec("iptables-legacy", "-A", "FORWARD", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	be := detect()
	backend, why := be.Name, be.Why
	if backend != BackendLegacy {
		t.Errorf("namespace with legacy rules: backend %s (%s), want %s", backend, why, BackendLegacy)
	}
	if _, err := exec.LookPath("iptables-legacy"); err != nil {
		t.Fatal("iptables-legacy missing")
	}
}

// Someone deletes sluice's jump, inserts a jump of their own above another, empties a set:
// Resync notices each, puts everything back as Install wrote it, and then finds nothing wrong.
func TestRulesResyncRepairs(t *testing.T) {
	rl := newRulesLab(t)
	r := rl.install(t, Config{Queues: queue.Spec{First: 31, Count: 1}, LocalPods: []netip.Addr{rB4, rB6},
		PodInterfaces: []string{rl.PodInterfaces()}})
	resync := func() []string {
		t.Helper()
		var got []string
		if err := rl.Node().Do(func() (err error) { got, err = r.Resync(); return err }); err != nil {
			t.Fatalf("Resync: %v", err)
		}
		return got
	}
	if got := resync(); got != nil {
		t.Fatalf("right after Install, Resync found %v wrong", got)
	}
	installed := rl.save(t, r.Backend())
	for _, step := range []struct {
		name string
		do   [][]string
		want string
	}{
		{"jump deleted (a firewalld reload)", [][]string{{"iptables", "-D", "FORWARD", "-j", ChainForward}}, "IPv4 filter jumps"},
		{"kube-proxy's jump prepended", [][]string{{"iptables", "-N", "KUBE-FORWARD"}, {"iptables", "-A", "KUBE-FORWARD", "-m", "mark", "--mark", "0x4000/0x4000", "-j", "ACCEPT"}, {"iptables", "-I", "FORWARD", "1", "-j", "KUBE-FORWARD"}}, "IPv4 filter jumps"},
		{"chain flushed", [][]string{{"ip6tables", "-F", ChainQueue}}, "IPv6 filter chains"},
		{"anti-spoofing jump deleted", [][]string{{"iptables", "-t", "raw", "-D", "PREROUTING", "-i", rl.PodInterfaces(), "-j", ChainAntispoof}}, "IPv4 raw jumps"},
		{"local set emptied", [][]string{{"ipset", "flush", LocalSet4}}, "set " + LocalSet4},
	} {
		for _, args := range step.do {
			if out, err := rl.NodeExec(args[0], args[1:]...); err != nil {
				t.Fatalf("%s: %v: %s", step.name, err, out)
			}
		}
		got := resync()
		if !slices.Contains(got, step.want) {
			t.Errorf("%s: Resync found %v, want %q among them", step.name, got, step.want)
		}
		if again := resync(); again != nil {
			t.Errorf("%s: a second Resync still found %v wrong", step.name, again)
		}
	}
	after := rl.save(t, r.Backend())
	// The only difference allowed: kube-proxy's own chain, now below sluice's jump.
	for _, l := range strings.Split(installed, "\n") {
		if strings.Contains(l, "SLUICE") && !strings.Contains(after, l) {
			t.Errorf("after the repairs %q is missing:\n%s", l, after)
		}
	}
	if !strings.Contains(after, "-A FORWARD -j SLUICE-FORWARD\n-A FORWARD -j KUBE-FORWARD") {
		t.Errorf("sluice's jump is not above KUBE-FORWARD after the repair:\n%s", after)
	}
	sets, _ := rl.NodeExec("ipset", "list", LocalSet4)
	if !strings.Contains(sets, rB4.String()) {
		t.Errorf("the emptied set was not refilled:\n%s", sets)
	}
}
