package netlab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

var (
	a4 = netip.MustParseAddr("10.244.1.2")
	a6 = netip.MustParseAddr("fd00:244::1:2")
	b4 = netip.MustParseAddr("10.244.2.2")
	b6 = netip.MustParseAddr("fd00:244::2:2")
)

const probeTimeout = 2 * time.Second

func twoPods(t *testing.T) (*Lab, *Host, *Host) {
	t.Helper()
	l := NewT(t)
	a, err := l.AddHost("pod-a", a4, a6)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddHost("pod-b", b4, b6)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*Host{a, b} {
		if err := h.ServeAll([]Proto{TCP, UDP, SCTP}, 80, 53); err != nil {
			t.Fatal(err)
		}
	}
	return l, a, b
}

func mustProbe(t *testing.T, l *Lab, from *Host, to netip.Addr, p Proto, port uint16, want bool) {
	t.Helper()
	got, err := l.Probe(from, to, p, port, probeTimeout)
	if err != nil {
		t.Fatalf("probe %s -> %s %v/%d: %v", from.Name, to, p, port, err)
	}
	if got != want {
		t.Fatalf("probe %s -> %s %v/%d: got through = %v, want %v", from.Name, to, p, port, got, want)
	}
}

func TestPodsTalkThroughNode(t *testing.T) {
	l, a, b := twoPods(t)
	for _, p := range []Proto{TCP, UDP, SCTP} {
		for _, port := range []uint16{80, 53} {
			mustProbe(t, l, a, b4, p, port, true)
			mustProbe(t, l, a, b6, p, port, true)
			mustProbe(t, l, b, a4, p, port, true)
			mustProbe(t, l, b, a6, p, port, true)
		}
	}
	// The node reaches pods too (kubelet-style probes come from there).
	mustProbe(t, l, l.Node(), b4, TCP, 80, true)
	mustProbe(t, l, l.Node(), b6, UDP, 53, true)
}

// The packets really cross the node's FORWARD chain as new connections (the hook sluice uses):
// count them with a conntrack NEW rule there, and drop them there to see probes fail.
func TestTrafficIsForwardedByNodeAndCanBeDropped(t *testing.T) {
	l, a, _ := twoPods(t)
	for _, ipt := range []string{"iptables", "ip6tables"} {
		for _, p := range []string{"tcp", "udp", "sctp"} {
			if _, err := l.NodeExec(ipt, "-A", "FORWARD", "-p", p, "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"); err != nil {
				t.Fatal(err)
			}
		}
	}
	mustProbe(t, l, a, b4, TCP, 80, true)
	mustProbe(t, l, a, b4, UDP, 53, true)
	mustProbe(t, l, a, b4, SCTP, 80, true)
	mustProbe(t, l, a, b6, TCP, 80, true)
	mustProbe(t, l, a, b6, UDP, 53, true)
	mustProbe(t, l, a, b6, SCTP, 80, true)
	for _, ipt := range []string{"iptables", "ip6tables"} {
		out, err := l.NodeExec(ipt, "-nvx", "-L", "FORWARD")
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"tcp", "udp", "sctp"} {
			if n := newPackets(out, p); n < 1 {
				t.Errorf("%s FORWARD: %d %s packets in state NEW, want >= 1 (SCTP needs a valid checksum to be NEW):\n%s", ipt, n, p, out)
			}
		}
	}

	for _, ipt := range []string{"iptables", "ip6tables"} {
		for _, p := range []string{"tcp", "udp", "sctp"} {
			if _, err := l.NodeExec(ipt, "-I", "FORWARD", "-p", p, "--dport", "80", "-j", "DROP"); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, to := range []netip.Addr{b4, b6} {
		for _, p := range []Proto{TCP, UDP, SCTP} {
			mustProbe(t, l, a, to, p, 80, false)
			mustProbe(t, l, a, to, p, 53, true)
		}
	}
}

var ruleLineRE = regexp.MustCompile(`^\s*(\d+)\s+\d+\s+ACCEPT\s+(\S+)`)

var protoNum = map[string]string{"tcp": "6", "udp": "17", "sctp": "132"}

func newPackets(listing, proto string) int {
	for _, line := range strings.Split(listing, "\n") {
		m := ruleLineRE.FindStringSubmatch(line)
		if m != nil && (m[2] == proto || m[2] == protoNum[proto]) && strings.Contains(line, "NEW") {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	return -1
}

func TestProbeErrors(t *testing.T) {
	l, a, _ := twoPods(t)
	if ok, err := l.Probe(a, b4, TCP, 9999, probeTimeout); ok || err == nil {
		t.Errorf("tcp to a closed port: ok=%v err=%v, want false and a 'nothing listens' error", ok, err)
	}
	if ok, err := l.Probe(a, b4, UDP, 9999, probeTimeout); ok || err == nil {
		t.Errorf("udp to a closed port: ok=%v err=%v, want false and an error", ok, err)
	}
	if ok, err := l.Probe(a, b4, SCTP, 9999, probeTimeout); ok || err == nil {
		t.Errorf("sctp to a closed port: ok=%v err=%v, want false and an error", ok, err)
	}
	// Nothing routes out of the lab: an address outside it is unreachable from the node.
	out := netip.MustParseAddr("192.0.2.1")
	if ok, _ := l.Probe(a, out, TCP, 80, probeTimeout); ok {
		t.Errorf("tcp to %s outside the lab got through", out)
	}
	routes, err := l.NodeExec("ip", "route", "show", "default")
	if err != nil || strings.TrimSpace(routes) != "" {
		t.Errorf("node namespace has a default route (%q, %v); the lab must not route out", routes, err)
	}
}

func TestNodeAddr(t *testing.T) {
	l, a, _ := twoPods(t)
	n4, n6 := netip.MustParseAddr("10.250.0.1"), netip.MustParseAddr("fd00:250::1")
	if err := l.AddNodeAddr(n4, n6); err != nil {
		t.Fatal(err)
	}
	if err := l.Node().ServeAll([]Proto{TCP, UDP}, 10250); err != nil {
		t.Fatal(err)
	}
	mustProbe(t, l, a, n4, TCP, 10250, true)
	mustProbe(t, l, a, n6, UDP, 10250, true)
	if l.HostByAddr(n4) != l.Node() {
		t.Errorf("HostByAddr(%v) is not the node", n4)
	}
}

// hostState is what the machine's own namespace shows; a lab must add nothing to it.
func hostState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{{"-o", "link"}, {"-o", "addr"}, {"route"}, {"-6", "route"}} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		b.Write(out)
	}
	return b.String()
}

func TestNothingInHostNamespaceAndCloseRemovesAll(t *testing.T) {
	l, err := New("close-test")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var hosts []*Host
	for i := 0; i < 3; i++ {
		h, err := l.AddHost(fmt.Sprintf("p%d", i), netip.MustParseAddr(fmt.Sprintf("10.244.9.%d", i+2)), netip.MustParseAddr(fmt.Sprintf("fd00:244::9:%d", i+2)))
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	// A process left running in a namespace must not keep the lab alive.
	sleeper := hosts[0].Command("sleep", "300")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- sleeper.Wait() }()

	during := hostState(t)
	for _, bad := range []string{l.ID, "10.244.9.", "fd00:244::9:", "169.254.1.1"} {
		if strings.Contains(during, bad) {
			t.Errorf("host namespace shows %q while the lab runs:\n%s", bad, during)
		}
	}
	if _, err := os.Stat(filepath.Join(markerDir, l.ID)); err != nil {
		t.Errorf("lab marker missing: %v", err)
	}

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Error("process started in a lab namespace still runs after Close")
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), l.ID) {
		t.Errorf("namespaces of %s remain after Close:\n%s", l.ID, out)
	}
	if _, err := os.Stat(filepath.Join(markerDir, l.ID)); !os.IsNotExist(err) {
		t.Errorf("lab marker remains after Close: %v", err)
	}
	if after := hostState(t); strings.Contains(after, l.ID) {
		t.Errorf("host namespace shows %s after Close:\n%s", l.ID, after)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestSweepRemovesStaleLab(t *testing.T) {
	l, err := New("stale")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.AddHost("p", a4); err != nil {
		t.Fatal(err)
	}
	// Pretend the owner died: a marker naming a process that does not exist.
	if err := os.WriteFile(filepath.Join(markerDir, l.ID), []byte("999999999 1 stale\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	live, err := New("live")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	Sweep(nil)
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), l.ID) {
		t.Errorf("stale namespaces of %s survived Sweep:\n%s", l.ID, out)
	}
	if !strings.Contains(string(out), live.ID) {
		t.Errorf("Sweep removed the live lab %s:\n%s", live.ID, out)
	}
}

func TestAddHostRejectsBadInput(t *testing.T) {
	l := NewT(t)
	if _, err := l.AddHost("Bad_Name", a4); err == nil {
		t.Error("accepted a bad host name")
	}
	if _, err := l.AddHost("x"); err == nil {
		t.Error("accepted a host without addresses")
	}
	if _, err := l.AddHost("p1", a4); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddHost("p2", a4); err == nil {
		t.Error("accepted a duplicate address")
	}
	if _, err := l.AddHost("p1", b4); err == nil {
		t.Error("accepted a duplicate name")
	}
	// A failed AddHost leaves no namespace behind.
	out, _ := exec.Command("ip", "netns", "list").Output()
	if n := strings.Count(string(out), l.ID+"-"); n != 2 {
		t.Errorf("%d namespaces of the lab, want 2 (node, p1):\n%s", n, out)
	}
}
