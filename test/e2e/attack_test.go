package e2e

// The adversarial suite (issue 12): a pod's processes are hostile, root in their namespace
// with NET_RAW and NET_ADMIN. They forge packets (netlab's Inject puts any IP packet on the
// pod's eth0 through a packet socket), add addresses to eth0 and flood. Each test sends the
// attack with real packets and checks, at the destination, that it did not work; where a flag
// switches the defence off, a control run with it off shows that the attack does work, so the
// test can fail.

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/netlab"
)

// agentArgs are the agent's arguments for an attack test. (While the defences were being
// written, it dropped the flags an older binary did not know, so that the same tests showed the
// attacks working on it; every flag exists now.)
func (w *world) agentArgs(args ...string) []string { return args }

// podIfaces names the lab's pod veths (anti-spoofing on, for this lab); noAntiSpoof switches it
// off.
func (w *world) podIfaces() string { return "--pod-interfaces=" + w.lab.PodInterfaces() }

const noAntiSpoof = "--pod-interfaces="

// token is a random marker carried in a forged packet's payload, so a capture at the
// destination recognises that very packet.
func token(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("sluice-attack-" + hex.EncodeToString(b))
}

// randPort is an ephemeral-range port for a forged flow, unlikely to meet the kernel's own.
func randPort(t *testing.T) uint16 {
	t.Helper()
	n, err := rand.Int(rand.Reader, big.NewInt(10000))
	if err != nil {
		t.Fatal(err)
	}
	return uint16(20000 + n.Int64())
}

// addrPort is the host's address of the family v6 with port.
func (w *world) addrPort(host string, v6 bool, port uint16) netip.AddrPort {
	w.t.Helper()
	a, ok := w.hosts[host].Addr(v6)
	if !ok {
		w.t.Fatalf("%s has no address of that family", host)
	}
	return netip.AddrPortFrom(a, port)
}

// inject forges packets on a pod's eth0.
func (w *world) inject(from string, pkts ...[]byte) {
	w.t.Helper()
	if err := w.hosts[from].Inject(pkts...); err != nil {
		w.t.Fatal(err)
	}
}

// pkt takes a built packet, failing the test when it could not be built.
func (w *world) pkt(b []byte, err error) []byte {
	w.t.Helper()
	if err != nil {
		w.t.Fatal(err)
	}
	return b
}

// capture records what arrives on a host's eth0 carrying tok.
func (w *world) capture(host string, tok []byte) *netlab.Capture {
	w.t.Helper()
	return w.captureFunc(host, func(p []byte) bool { return bytes.Contains(p, tok) })
}

// captureFunc records what arrives on a host's eth0 and satisfies match.
func (w *world) captureFunc(host string, match func([]byte) bool) *netlab.Capture {
	w.t.Helper()
	c, err := w.hosts[host].Capture(match)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { c.Close() })
	return c
}

// arrives reports whether a packet carrying the capture's token arrived within timeout.
func arrives(c *netlab.Capture, timeout time.Duration) bool { return c.Wait(1, timeout) > 0 }

const oneWayWait = time.Second

// exchange connects from h (from local port lport, or any when 0) to dst, sends a byte and
// reads it back. nil means the connection worked; a timeout means it was dropped; other errors
// (refused) say that packets did get somewhere.
func exchange(h *netlab.Host, lport uint16, dst netip.AddrPort, timeout time.Duration) error {
	var src netip.AddrPort
	if lport != 0 {
		a, _ := h.Addr(dst.Addr().Is6())
		src = netip.AddrPortFrom(a, lport)
	}
	return exchangeFrom(h, src, dst, timeout)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// conntrackDump is the node's conntrack table, for failure messages.
func (w *world) conntrackDump() string {
	out, _ := w.lab.NodeExec("conntrack", "-L")
	return out
}

// Item 1: a packet that cannot open a connection must never create the state that lets a
// later connection through.
func TestAttackNonOpeningState(t *testing.T) {
	w := newWorld(t)
	// backend admits only the frontend on 8080; "other" may not reach it. Nothing isolates
	// other's ingress or backend's egress, so the reverse flow (backend -> other) is allowed:
	// exactly what a "reply" rule would admit.
	w.writeState(example(t, "allow-frontend.yaml"))
	server := w.addrPort("backend", false, 8080)
	other, _ := w.hosts["other"].Addr(false)

	t.Run("queue-all: bare ACK then connect from its port", func(t *testing.T) {
		w := w.sub(t)
		w.startAgent(w.agentArgs("--state", w.state, "--mode", "queue-all", w.podIfaces())...)
		w.check([]flow{deny("other", "backend", tcp, 8080), allow("frontend", "backend", tcp, 8080)})
		p := randPort(t)
		w.inject("other", w.pkt(netlab.Segment{Src: netip.AddrPortFrom(other, p), Dst: server, ACK: true, Seq: 1000, Ack: 2000}.Bytes()))
		time.Sleep(200 * time.Millisecond)
		if err := exchange(w.hosts["other"], p, server, probeTimeout); err == nil {
			t.Errorf("a bare ACK from port %d to %v made the denied connection from that port work", p, server)
		} else if !isTimeout(err) {
			t.Errorf("connect from port %d after the bare ACK: %v (packets reached the server)", p, err)
		}
		w.check([]flow{deny("other", "backend", tcp, 8080)})
	})

	// In the default mode only conntrack NEW is queued. The pickup ACK carries an MD5 option, so
	// the server drops it silently instead of resetting the entry; a forged "reply" (with the
	// option too, so the pod's own stack stays silent) marks the entry as replied; the SYN from
	// that port is then ESTABLISHED to conntrack and never queued. The forged reply is a spoof,
	// so anti-spoofing is off here: this tests the non-opening rule on its own.
	t.Run("new-only: pickup ACK, forged reply, then SYN", func(t *testing.T) {
		w := w.sub(t)
		w.startAgent(w.agentArgs("--state", w.state, noAntiSpoof)...)
		w.check([]flow{deny("other", "backend", tcp, 8080), allow("frontend", "backend", tcp, 8080)})
		p := randPort(t)
		client := netip.AddrPortFrom(other, p)
		w.inject("other",
			w.pkt(netlab.Segment{Src: client, Dst: server, ACK: true, Seq: 1000, Ack: 2000, MD5: true}.Bytes()))
		time.Sleep(100 * time.Millisecond)
		w.inject("other",
			w.pkt(netlab.Segment{Src: server, Dst: client, ACK: true, Seq: 2000, Ack: 1000, MD5: true}.Bytes()))
		time.Sleep(200 * time.Millisecond)
		ct := w.conntrackDump()
		if err := exchange(w.hosts["other"], p, server, probeTimeout); err == nil {
			t.Errorf("pickup ACK + forged reply from port %d made the denied connection to %v work; conntrack before the SYN:\n%s", p, server, ct)
		} else if !isTimeout(err) {
			t.Errorf("connect from port %d: %v (packets reached the server)", p, err)
		}
		w.check([]flow{deny("other", "backend", tcp, 8080)})
	})
}

// sub is the world seen from a subtest: failures and cleanups (the agent) belong to it.
func (w *world) sub(t *testing.T) *world {
	c := *w
	c.t = t
	return &c
}

// serveSlowEcho answers on port after delay: TCP echoes each read, UDP each datagram. A reply
// that waits lets a test change the node (flush conntrack, flood) between a request and its
// answer, so that the answer is the first packet the node sees afterwards.
func (w *world) serveSlowEcho(host string, proto netlab.Proto, port uint16, delay time.Duration) {
	w.t.Helper()
	h := w.hosts[host]
	addr := fmt.Sprintf(":%d", port)
	switch proto {
	case tcp:
		ln := openIn(w, h, func() (net.Listener, error) { return net.Listen("tcp", addr) })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go slowEchoStream(c, delay)
			}
		}()
	case udp:
		pc := openIn(w, h, func() (net.PacketConn, error) { return net.ListenPacket("udp", addr) })
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				msg := bytes.Clone(buf[:n])
				time.AfterFunc(delay, func() { pc.WriteTo(msg, from) })
			}
		}()
	default:
		w.t.Fatalf("serveSlowEcho: %v", proto)
	}
}

func slowEchoStream(c net.Conn, delay time.Duration) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	buf := make([]byte, 256)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		time.Sleep(delay)
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
	}
}

// udpClient is one UDP socket of a pod talking to one server: every datagram is the same
// 5-tuple.
type udpClient struct {
	c   *net.UDPConn
	dst netip.AddrPort
}

func (w *world) udpDial(from string, dst netip.AddrPort) *udpClient {
	w.t.Helper()
	c := openIn(w, w.hosts[from], func() (*net.UDPConn, error) { return net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst)) })
	return &udpClient{c, dst}
}

// openIn opens a socket inside a host's namespace, closed when the test ends.
func openIn[T io.Closer](w *world, h *netlab.Host, open func() (T, error)) T {
	w.t.Helper()
	var v T
	if err := h.Do(func() (err error) { v, err = open(); return err }); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { v.Close() })
	return v
}

func (u *udpClient) send(msg []byte) error { _, err := u.c.Write(msg); return err }

// await reads datagrams until msg comes back or timeout passes.
func (u *udpClient) await(msg []byte, timeout time.Duration) bool {
	u.c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 1500)
	for {
		n, err := u.c.Read(buf)
		if err != nil {
			return false
		}
		if bytes.Equal(buf[:n], msg) {
			return true
		}
	}
}

// flushPolicies isolate the frontend both ways; it may reach the backend on TCP 7000 (which
// admits it) and CoreDNS on UDP 5300. Replies to the frontend are admitted by nothing but the
// memory of the connection it opened.
var flushPolicies = []string{`
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: production}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-out, namespace: production}
spec:
  podSelector: {matchLabels: {tier: frontend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {tier: backend}}}]
    ports: [{port: 7000}]
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
    ports: [{port: 5300, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-in, namespace: production}
spec:
  podSelector: {matchLabels: {tier: backend}}
  ingress: [{from: [{podSelector: {matchLabels: {tier: frontend}}}], ports: [{port: 7000}]}]
`}

// Item 1, the legitimate side: after a conntrack flush the next packet of a connection sluice
// accepted arrives as NEW, from either end, and must still pass, for TCP and UDP, in both modes.
// TestConntrackFlushMidStream covers the TCP server's answer first in the default mode; this
// covers the client's segment first, UDP answers and requests, and queue-all.
func TestAttackFlushKeepsAccepted(t *testing.T) {
	w := newWorld(t)
	w.writeState(flushPolicies...)
	const delay = 1200 * time.Millisecond
	w.serveSlowEcho("backend", tcp, 7000, delay)
	w.serveSlowEcho("coredns", udp, 5300, delay)
	for _, mode := range []string{"new-only", "queue-all"} {
		t.Run(mode, func(t *testing.T) {
			w := w.sub(t)
			w.startAgent(w.agentArgs("--state", w.state, "--mode", mode, "--fail-open=false", w.podIfaces())...)
			w.check([]flow{deny("backend", "frontend", tcp, 80), deny("coredns", "frontend", udp, 53), deny("other", "backend", tcp, 7000)})
			flush := func() {
				t.Helper()
				if err := w.lab.FlushConntrack(); err != nil {
					t.Fatal(err)
				}
			}

			c := w.dial("frontend", "backend", 7000)
			if !c.echo(probeTimeout) {
				t.Fatal("TCP connection does not work before the flush")
			}
			// The client speaks first after the flush: its data segment is NEW to conntrack.
			flush()
			if !c.echo(probeTimeout) {
				t.Error("TCP: the client's first segment after a conntrack flush was dropped")
			}
			// The server speaks first after the flush: its answer is NEW to conntrack.
			c.c.SetDeadline(time.Now().Add(probeTimeout))
			if _, err := c.c.Write([]byte("s")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			flush()
			got := make([]byte, 1)
			if _, err := io.ReadFull(c.c, got); err != nil || got[0] != 's' {
				t.Errorf("TCP: the server's answer after a conntrack flush did not arrive: %v", err)
			}

			u := w.udpDial("frontend", w.addrPort("coredns", false, 5300))
			for i, first := range []string{"request", "answer"} {
				msg := token(t)
				if first == "request" {
					flush()
				}
				if err := u.send(msg); err != nil {
					t.Fatal(err)
				}
				if first == "answer" {
					time.Sleep(300 * time.Millisecond)
					flush()
				}
				if !u.await(msg, probeTimeout) {
					t.Errorf("UDP exchange %d (the %s first after a conntrack flush): no answer", i, first)
				}
			}
		})
	}
}

// Item 2: a pod is more than its source address. A deny-all-egress pod ("other", under
// default-deny-egress) that claims an address it does not own, or another local pod's, or
// talks from its IPv6 link-local address, must not get past its policy.
func TestAttackSpoofing(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-egress.yaml"))
	att := w.hosts["other"]
	// Two addresses nobody owns. The lab is routed (as Calico, ptp, Cilium's veth mode): the
	// node routes neither to the attacker, so a TCP handshake from them cannot complete, but
	// the SYN that reaches its target is the breach (on a bridged CNI the answer would come back
	// by ARP), and one-way UDP and ICMP carry data out.
	claimed := netip.MustParseAddr("10.244.1.98")
	routed := netip.MustParseAddr("10.244.1.99")
	for _, a := range []netip.Addr{claimed, routed} {
		if err := att.AddAddr(a); err != nil {
			t.Fatal(err)
		}
	}
	// The node's own global IPv6 address, which the deny-all pod may not reach, and a service
	// on every node address, its link-local fe80::1 on each pod veth included.
	nodeGlobal := netip.MustParseAddr("fd00:ffff::1")
	if err := w.lab.AddNodeAddr(nodeGlobal); err != nil {
		t.Fatal(err)
	}
	if err := w.lab.Node().Serve(tcp, 8443); err != nil {
		t.Fatal(err)
	}
	prometheus, _ := w.hosts["prometheus"].Addr(false)
	extWeb := w.addrPort("ext-web", false, 53)

	type attack struct {
		name string
		try  func(w *world) error // nil: the attack worked
	}
	oneWay := func(w *world, pkt []byte, tok []byte) error {
		c := w.capture("ext-web", tok)
		w.inject("other", pkt)
		if arrives(c, oneWayWait) {
			return nil
		}
		return errors.New("nothing arrived at ext-web")
	}
	attacks := []attack{
		{"second address, TCP SYN to a pod", func(w *world) error {
			syns := w.captureFunc("prometheus", synTo(claimed, prometheus, 9090))
			exchangeFrom(att, netip.AddrPortFrom(claimed, 0), netip.AddrPortFrom(prometheus, 9090), time.Second)
			if len(syns.Packets()) > 0 {
				return nil
			}
			return errors.New("no SYN reached prometheus")
		}},
		{"second address, one-way UDP to an outside host", func(w *world) error {
			tok := token(w.t)
			return oneWay(w, w.pkt(netlab.UDPPacket(netip.AddrPortFrom(routed, randPort(w.t)), extWeb, tok)), tok)
		}},
		{"second address, one-way ICMP echo to an outside host", func(w *world) error {
			tok := token(w.t)
			return oneWay(w, w.pkt(netlab.ICMPPacket(routed, extWeb.Addr(), 8, 0, append([]byte{0, 1, 0, 1}, tok...), 0)), tok)
		}},
		{"another local pod's address, one-way UDP to an outside host", func(w *world) error {
			tok := token(w.t)
			return oneWay(w, w.pkt(netlab.UDPPacket(netip.AddrPortFrom(prometheus, randPort(w.t)), extWeb, tok)), tok)
		}},
		{"IPv6 link-local to the node's link-local address", func(w *world) error {
			return exchange(att, 0, netip.AddrPortFrom(w.gatewayLL("other"), 8443), probeTimeout)
		}},
	}
	run := func(w *world, args ...string) []error {
		w.startAgent(w.agentArgs(append([]string{"--state", w.state}, args...)...)...)
		w.check([]flow{deny("other", "prometheus", tcp, 9090), deny("other", "ext-web", udp, 53)})
		if err := exchange(att, 0, netip.AddrPortFrom(nodeGlobal, 8443), probeTimeout); err == nil || !isTimeout(err) {
			w.t.Errorf("the deny-all pod to the node's global address %v: %v; want a timeout (denied)", nodeGlobal, err)
		}
		var got []error
		for _, a := range attacks {
			got = append(got, a.try(w))
		}
		return got
	}
	t.Run("defended", func(t *testing.T) {
		w := w.sub(t)
		for i, err := range run(w, w.podIfaces()) {
			if err == nil {
				t.Errorf("%s: the attack worked: the deny-all pod got through", attacks[i].name)
			}
		}
		if v := w.pollMetric("sluice_antispoof_dropped_total", 0, 15*time.Second); v == 0 {
			t.Error("sluice_antispoof_dropped_total is 0 after the spoofed packets")
		}
	})
	t.Run("control: anti-spoofing off", func(t *testing.T) {
		w := w.sub(t)
		for i, err := range run(w, noAntiSpoof) {
			if err != nil {
				t.Errorf("%s: did not work with anti-spoofing off (%v), so the defended run proves nothing", attacks[i].name, err)
			} else {
				t.Logf("%s: works with anti-spoofing off", attacks[i].name)
			}
		}
	})
}

// exchangeFrom is exchange from a given source address (port 0: any; the zero AddrPort: what
// the kernel chooses).
func exchangeFrom(h *netlab.Host, src netip.AddrPort, dst netip.AddrPort, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var c net.Conn
	err := h.Do(func() (err error) {
		d := net.Dialer{Deadline: deadline}
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(src)
		}
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte{0x5a}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err
}

// gatewayLL is the node's link-local gateway as the pod sees it, with the pod's eth0 index as
// its zone: Go caches zone names process-wide, and "eth0" is another interface in every
// namespace.
func (w *world) gatewayLL(pod string) netip.Addr {
	w.t.Helper()
	var idx int
	if err := w.hosts[pod].Do(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err == nil {
			idx = ifc.Index
		}
		return err
	}); err != nil {
		w.t.Fatal(err)
	}
	return netlab.Gateway6.WithZone(fmt.Sprint(idx))
}

// pollMetric waits until the metric (line prefix) exceeds min, for metrics the agent updates
// at its rule resync; it returns the last value seen.
func (w *world) pollMetric(prefix string, min float64, timeout time.Duration) float64 {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v := w.metric(prefix)
		if v > min || time.Now().After(deadline) {
			return v
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// floodOutcome is what a victim pod saw while another pod flooded.
type floodOutcome struct {
	sent                     int
	deniedOK, deniedTries    int
	allowedOK, allowedTries  int
	queueStats, packetCounts string
}

// floodAndProbe floods new UDP flows from "decoy" to ext-web (at most 5 s and 4M datagrams)
// while "other" tries, over and over, a connection its policy denies and, now and then, one it
// allows.
func (w *world) floodAndProbe(denied, allowed netip.AddrPort) floodOutcome {
	w.t.Helper()
	extWeb, _ := w.hosts["ext-web"].Addr(false)
	var o floodOutcome
	var floodErr error
	done := make(chan struct{})
	// One sender per CPU from the one pod: the reader (filter/nfq) outruns a single sender on
	// this machine, and a hostile pod has as many threads as it likes. The bounds hold for the
	// flood as a whole.
	senders := runtime.NumCPU() + 1
	go func() {
		defer close(done)
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := range senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n, err := w.hosts["decoy"].FloodUDP(netlab.Flood{
					Dst: extWeb, FirstPort: uint16(10000 + 2048*i), Ports: 2048,
					MaxPackets: 4_000_000 / senders, MaxDuration: 5 * time.Second,
				})
				mu.Lock()
				o.sent += n
				if err != nil && floodErr == nil {
					floodErr = err
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
	}()
	time.Sleep(500 * time.Millisecond) // let the flood fill the queue
	// The denied connection gets through only when its SYN meets a full queue, which is a matter
	// of luck per try: many short tries (a SYN that passes connects in well under a millisecond
	// here), on their own goroutine so the slower allowed probes do not thin them out, give the
	// control run a chance that does not depend on the machine's speed.
	var probes sync.WaitGroup
	// untilDone tries dst over and over until the flood ends, counting tries and successes.
	untilDone := func(dst netip.AddrPort, timeout, pause time.Duration, tries, ok *int) {
		probes.Add(1)
		go func() {
			defer probes.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				*tries++
				if exchange(w.hosts["other"], 0, dst, timeout) == nil {
					*ok++
				}
				time.Sleep(pause)
			}
		}()
	}
	untilDone(denied, 250*time.Millisecond, 0, &o.deniedTries, &o.deniedOK)
	untilDone(allowed, probeTimeout, 200*time.Millisecond, &o.allowedTries, &o.allowedOK)
	probes.Wait()
	if floodErr != nil {
		w.t.Fatal(floodErr)
	}
	o.queueStats, _ = w.lab.NodeExec("cat", "/proc/net/netfilter/nfnetlink_queue")
	_, body, _ := w.httpGet("/metrics", 3*time.Second)
	var lines []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "sluice_packets_total") || strings.HasPrefix(l, "sluice_queue_") || strings.HasPrefix(l, "sluice_admission") {
			lines = append(lines, l)
		}
	}
	o.packetCounts = strings.Join(lines, "\n")
	w.t.Logf("flood: %d datagrams sent; denied connection worked %d of %d times; allowed one %d of %d\nnfnetlink_queue: %s%s",
		o.sent, o.deniedOK, o.deniedTries, o.allowedOK, o.allowedTries, o.queueStats, o.packetCounts)
	return o
}

// Item 3: one pod flooding new flows must not push the node into fail-open for the others.
func TestAttackFailOpenFlood(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "allow-frontend.yaml"))
	denied := w.addrPort("backend", false, 8080)
	allowed := w.addrPort("prometheus", false, 9090)
	t.Run("defended", func(t *testing.T) {
		w := w.sub(t)
		w.startAgent(w.agentArgs("--state", w.state, w.podIfaces(), "--resync-interval=2s")...)
		w.check([]flow{deny("other", "backend", tcp, 8080), allow("other", "prometheus", tcp, 9090)})
		o := w.floodAndProbe(denied, allowed)
		if o.deniedOK > 0 {
			t.Errorf("during the flood the denied connection other -> backend:8080 worked %d of %d times", o.deniedOK, o.deniedTries)
		}
		if o.allowedOK != o.allowedTries {
			t.Errorf("during the flood the allowed connection other -> prometheus:9090 failed %d of %d times", o.allowedTries-o.allowedOK, o.allowedTries)
		}
		if v := w.pollMetric("sluice_admission_dropped_total", 0, 15*time.Second); v == 0 {
			t.Error("sluice_admission_dropped_total is 0 after the flood")
		}
		w.check([]flow{deny("other", "backend", tcp, 8080), allow("other", "prometheus", tcp, 9090)})
	})
	t.Run("control: admission limit off", func(t *testing.T) {
		w := w.sub(t)
		w.startAgent(w.agentArgs("--state", w.state, w.podIfaces(), "--admission-rate=0", "--resync-interval=2s")...)
		w.check([]flow{deny("other", "backend", tcp, 8080)})
		o := w.floodAndProbe(denied, allowed)
		if o.deniedOK == 0 {
			t.Errorf("control: without the admission limit the flood never let the denied connection through (%d tries), so the defended run proves nothing", o.deniedTries)
		}
		// What the kernel accepted past a full queue had no verdict; it must be counted.
		if v := w.pollMetric("sluice_queue_unjudged_total", 0, 15*time.Second); v == 0 {
			t.Error("sluice_queue_unjudged_total is 0 although the queue overflowed into fail-open")
		}
	})
}

// ipt runs iptables (ip6tables when v6) in the node namespace with the backend sluice uses:
// rules of both backends coexist in the kernel, but in no defined order.
func (w *world) ipt(v6 bool, args ...string) {
	w.t.Helper()
	cmd := "iptables"
	if v6 {
		cmd = "ip6tables"
	}
	cmd += "-" + w.iptBackend()
	if out, err := w.lab.NodeExec(cmd, append([]string{"-w", "5"}, args...)...); err != nil {
		w.t.Fatalf("%v\n%s", err, out)
	}
}

// iptBackend is "legacy" when sluice's chains are there, else "nft" (what sluice picks on a
// node without legacy rules).
func (w *world) iptBackend() string {
	out, _ := w.lab.NodeExec("iptables-legacy-save", "-t", "filter")
	if strings.Contains(out, ":SLUICE-") {
		return "legacy"
	}
	return "nft"
}

// Item 4: exemptions must not be covert channels. From a deny-all-egress pod ("other"),
// forged ICMP replies and errors, an unassigned ICMPv6 type and a neighbour solicitation to a
// global address must not reach an outside host; traffic the node marks NOTRACK (as NodeLocal
// DNSCache does for DNS) must still be judged.
func TestAttackCovertChannels(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-egress.yaml"))
	src4, _ := w.hosts["other"].Addr(false)
	src6, _ := w.hosts["other"].Addr(true)
	dst4, _ := w.hosts["ext-web"].Addr(false)
	dst6, _ := w.hosts["ext-web6"].Addr(true)
	type covert struct {
		name string
		to   string
		pkt  func(tok []byte) []byte
	}
	covers := []covert{
		{"ICMP echo reply", "ext-web", func(tok []byte) []byte {
			return w.pkt(netlab.ICMPPacket(src4, dst4, 0, 0, append([]byte{0x12, 0x34, 0, 1}, tok...), 0))
		}},
		{"ICMP destination unreachable", "ext-web", func(tok []byte) []byte {
			// The "original" datagram it quotes: ext-web -> other, which never was.
			quoted := w.pkt(netlab.UDPPacket(netip.AddrPortFrom(dst4, 53), netip.AddrPortFrom(src4, 33333), tok))
			return w.pkt(netlab.ICMPPacket(src4, dst4, 3, 3, append(make([]byte, 4), quoted...), 0))
		}},
		{"ICMP timestamp reply", "ext-web", func(tok []byte) []byte {
			return w.pkt(netlab.ICMPPacket(src4, dst4, 14, 0, append(append([]byte{0x12, 0x34, 0, 1}, make([]byte, 12)...), tok...), 0))
		}},
		{"ICMPv6 type 100 (unassigned)", "ext-web6", func(tok []byte) []byte {
			return w.pkt(netlab.ICMPPacket(src6, dst6, 100, 0, append(make([]byte, 4), tok...), 0))
		}},
		{"ICMPv6 neighbour solicitation to a global address", "ext-web6", func(tok []byte) []byte {
			body := append(make([]byte, 4), dst6.AsSlice()...)
			return w.pkt(netlab.ICMPPacket(src6, dst6, 135, 0, append(body, tok...), 255))
		}},
	}
	// arrived sends every covert packet and reports which arrived.
	arrived := func(w *world) []bool {
		var got []bool
		for _, c := range covers {
			tok := token(w.t)
			cp := w.capture(c.to, tok)
			w.inject("other", c.pkt(tok))
			got = append(got, arrives(cp, oneWayWait))
			cp.Close()
		}
		return got
	}
	// NodeLocal DNSCache's rules: DNS is not tracked, either way.
	w.ipt(false, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "CT", "--notrack")
	w.ipt(false, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--sport", "53", "-j", "CT", "--notrack")
	dns := func(w *world) bool {
		ok, err := w.lab.Probe(w.hosts["other"], w.addrPort("coredns", false, 53).Addr(), udp, 53, probeTimeout)
		if err != nil {
			w.t.Fatal(err)
		}
		return ok
	}

	t.Run("control: no agent", func(t *testing.T) {
		w := w.sub(t)
		for i, ok := range arrived(w) {
			if !ok {
				t.Errorf("%s did not reach %s even without sluice: the test cannot tell", covers[i].name, covers[i].to)
			}
		}
		if !dns(w) {
			t.Error("untracked DNS from other to coredns does not work even without sluice: the test cannot tell")
		}
	})
	for _, mode := range []string{"new-only", "queue-all"} {
		t.Run(mode, func(t *testing.T) {
			w := w.sub(t)
			w.startAgent(w.agentArgs("--state", w.state, "--mode", mode, w.podIfaces())...)
			w.check([]flow{deny("other", "ext-web", tcp, 80), deny("other", "coredns", tcp, 80), v6(deny("other", "ext-web6", tcp, 80))})
			for i, ok := range arrived(w) {
				if ok {
					t.Errorf("%s from the deny-all-egress pod reached %s", covers[i].name, covers[i].to)
				}
			}
			if dns(w) {
				t.Error("untracked (NOTRACK) DNS from the deny-all-egress pod to coredns got through unjudged")
			}
		})
	}
}

// Item 5: replies to flows sluice accepted must pass, whatever the flags and whatever another
// pod does.
func TestAttackReplies(t *testing.T) {
	w := newWorld(t)
	w.writeState(flushPolicies...)

	// With --offload the kernel accepts repeat requests before sluice's return table sees them,
	// so their replies find no entry: the combination must be refused, not half-work.
	t.Run("queue-all with offload is refused", func(t *testing.T) {
		w := w.sub(t)
		a := w.spawnAgent("--state", w.state, "--mode", "queue-all", "--offload")
		code, err := a.Wait(10 * time.Second)
		switch {
		case err != nil:
			t.Fatalf("the agent started with --mode queue-all --offload instead of refusing (%v)", err)
		case code == 0:
			t.Fatalf("the agent exited 0 with --mode queue-all --offload; log:\n%s", a.log())
		}
		if out := a.log(); !strings.Contains(out, "--offload") || !strings.Contains(out, "queue-all") {
			t.Errorf("the refusal does not name both --offload and --mode queue-all:\n%s", out)
		}
		if rules, sets, dump := w.sluiceRules(); rules != 0 || sets != 0 {
			t.Errorf("the refused agent left %d rules and %d sets:\n%s", rules, sets, dump)
		}
	})

	// A pod flooding new flows fills a small return table (--cache-size 4096 entries, two per
	// flow) many times over while the victims' answers are on their way: a UDP answer on an
	// ongoing 5-tuple to an ingress-isolated client, and an established TCP connection's echo.
	t.Run("flood of new flows does not evict live flows", func(t *testing.T) {
		w := w.sub(t)
		const delay = 3 * time.Second
		w.serveSlowEcho("backend", tcp, 7000, delay)
		w.serveSlowEcho("coredns", udp, 5300, delay)
		w.startAgent(w.agentArgs("--state", w.state, "--mode", "queue-all", "--cache-size", "4096", w.podIfaces())...)
		w.check([]flow{deny("coredns", "frontend", udp, 53), deny("backend", "frontend", tcp, 80)})
		u := w.udpDial("frontend", w.addrPort("coredns", false, 5300))
		c := w.dial("frontend", "backend", 7000)
		// One exchange each before the flood: the flows are live.
		first := token(t)
		if err := u.send(first); err != nil {
			t.Fatal(err)
		}
		if !c.echo(delay + probeTimeout) {
			t.Fatal("TCP echo does not work before the flood")
		}
		if !u.await(first, probeTimeout) {
			t.Fatal("UDP exchange does not work before the flood")
		}

		msg := token(t)
		if err := u.send(msg); err != nil {
			t.Fatal(err)
		}
		c.c.SetDeadline(time.Now().Add(2 * (delay + probeTimeout)))
		if _, err := c.c.Write(msg); err != nil {
			t.Fatal(err)
		}
		extWeb, _ := w.hosts["ext-web"].Addr(false)
		// Paced below what the agent serves, so its queue never overflows: the answers are
		// judged, and arrive after the flood is over.
		sent, err := w.hosts["decoy"].FloodUDP(netlab.Flood{
			Dst: extWeb, FirstPort: 10000, Ports: 10000, Rate: 5000,
			MaxPackets: 10000, MaxDuration: 2 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("flood: %d new flows from decoy", sent)
		if !u.await(msg, delay+probeTimeout) {
			t.Error("the UDP answer on the ongoing 5-tuple frontend -> coredns:5300 was dropped after another pod's flood")
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c.c, got); err != nil || !bytes.Equal(got, msg) {
			t.Errorf("the established TCP connection frontend -> backend:7000 lost its echo after another pod's flood: %v", err)
		}
		t.Logf("packets: tracked %v, reply %v, egress-denied drops %v, ingress-denied drops %v",
			w.metric(`sluice_packets_total{reason="tracked",verdict="accept"}`), w.metric(`sluice_packets_total{reason="reply",verdict="accept"}`),
			w.metric(`sluice_packets_total{reason="egress-denied",verdict="drop"}`), w.metric(`sluice_packets_total{reason="ingress-denied",verdict="drop"}`))
	})
}

// backendClosed isolates only the backend for ingress, admitting nobody: the frontend's own
// policies (none) do not change.
const backendClosed = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-closed, namespace: production}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress]
`

// Item 6: --cut-established cuts a connection whose opening flow the new snapshot denies, also
// when only the server's side changed (the client is not isolated for ingress, so the server's
// packets to it are allowed on their own).
func TestAttackCutEstablished(t *testing.T) {
	w := newWorld(t)
	for _, mode := range []string{"new-only", "queue-all"} {
		t.Run(mode, func(t *testing.T) {
			w := w.sub(t)
			w.writeState(example(t, "allow-frontend.yaml"))
			a := w.startAgent(w.agentArgs("--state", w.state, "--mode", mode, "--cut-established", w.podIfaces())...)
			c := w.dial("frontend", "backend", 8080)
			if !c.echo(probeTimeout) {
				t.Fatal("connection does not work before the change")
			}
			w.reload(a, backendClosed)
			changed := time.Now()
			const bound = 5 * time.Second
			for time.Since(changed) < bound {
				if !c.echo(time.Second) {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			if time.Since(changed) >= bound {
				t.Fatalf("the connection frontend -> backend:8080 still passes data %s after the agent put in force the snapshot that denies it", bound)
			}
			// Cut means cut: nothing more gets through, the retransmissions included.
			c.c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if n, _ := c.c.Read(make([]byte, 64)); n > 0 {
				t.Errorf("data still arrived after the connection stopped (%d bytes)", n)
			}
			t.Logf("the connection stopped within %s of the new generation", time.Since(changed).Round(100*time.Millisecond))
			w.check([]flow{deny("frontend", "backend", tcp, 8080), allow("backend", "frontend", tcp, 80)})
		})
	}
}

// Item 2, a pod not yet in any snapshot: its interface is a pod interface, but no policy
// knows its address. Its traffic follows the fail mode: dropped both ways with
// --fail-open=false, passing with --fail-open=true (the control).
func TestAttackUnknownPod(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-egress.yaml"))
	h, err := w.lab.AddHost("newcomer", netip.MustParseAddr("10.244.1.50"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Serve(tcp, 80); err != nil {
		t.Fatal(err)
	}
	w.hosts["newcomer"] = h
	flows := func(want bool) []flow {
		return []flow{
			{from: "newcomer", to: "prometheus", proto: tcp, port: 9090, want: want},
			{from: "prometheus", to: "newcomer", proto: tcp, port: 80, want: want},
		}
	}
	for _, failOpen := range []bool{false, true} {
		name := map[bool]string{false: "fail-closed: dropped", true: "control: fail-open passes"}[failOpen]
		t.Run(name, func(t *testing.T) {
			w := w.sub(t)
			w.startAgent(w.agentArgs("--state", w.state, fmt.Sprintf("--fail-open=%v", failOpen), w.podIfaces())...)
			w.check([]flow{allow("prometheus", "frontend", tcp, 80), deny("frontend", "prometheus", tcp, 9090)})
			for _, f := range flows(failOpen) {
				w.probeExpect(f)
			}
		})
	}
}
