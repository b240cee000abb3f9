package e2e

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Measured fail-open / fail-closed behaviour with the agent killed (SIGKILL: no cleanup runs,
// the rules stay behind as after a crash).
func TestAgentKilled(t *testing.T) {
	for _, failOpen := range []bool{true, false} {
		name := map[bool]string{true: "fail-open", false: "fail-closed"}[failOpen]
		t.Run(name, func(t *testing.T) {
			w := newWorld(t)
			w.writeState(example(t, "three-tier.yaml"))
			a := w.startAgent("--state", w.state, "--fail-open="+map[bool]string{true: "true", false: "false"}[failOpen])
			w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
			established := w.dial("frontend", "backend", 8080)
			if !established.echo(probeTimeout) {
				t.Fatal("established connection does not echo")
			}
			a.signal(syscall.SIGKILL)
			a.waitExit(5 * time.Second)
			if rules, _, _ := w.sluiceRules(); rules == 0 {
				t.Fatal("SIGKILL must leave the rules behind (as a crash does)")
			}
			if !established.echo(probeTimeout) {
				t.Error("a connection established before the agent died must keep working (it is not queued)")
			}
			if failOpen {
				// Nobody reads the queue and --queue-bypass is set: everything is accepted,
				// what the policy denies included.
				for _, f := range []flow{allow("frontend", "backend", tcp, 8080), allow("other", "backend", tcp, 8080), allow("other", "database", udp, 53)} {
					w.probeExpect(f)
				}
			} else {
				// No reader and no bypass: every new connection is dropped, allowed ones too.
				for _, f := range []flow{deny("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080), deny("other", "database", udp, 53)} {
					w.probeExpect(f)
				}
			}
			out, err := w.lab.NodeExec(sluiceBin, "agent", "--cleanup")
			if err != nil {
				t.Fatalf("--cleanup: %v\n%s", err, out)
			}
			if rules, sets, dump := w.sluiceRules(); rules != 0 || sets != 0 {
				t.Fatalf("--cleanup left %d rules and %d sets:\n%s", rules, sets, dump)
			}
			w.probeExpect(allow("other", "backend", tcp, 8080))
		})
	}
}

// probeExpect probes one flow without consulting the policy engine (for states where the
// kernel, not the policy, decides: no agent, a stopped agent).
func (w *world) probeExpect(f flow) {
	w.t.Helper()
	_, dst := w.addrs(f)
	ok, err := w.lab.Probe(w.hosts[f.from], dst, f.proto, f.port, probeTimeout)
	if err != nil {
		w.t.Errorf("%v: probe error: %v", f, err)
	} else if ok != f.want {
		w.t.Errorf("%v: got allowed=%v", f, ok)
	}
}

// A stopped agent (SIGSTOP) black-holes new connections even with --queue-bypass, and its
// /healthz stops answering, which is what a liveness probe acts on. Once resumed it serves the
// packets that waited and does not mistake the pause for a stall.
func TestStoppedAgentAndHealth(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "three-tier.yaml"))
	a := w.startAgent("--state", w.state) // fail-open
	if st, _, err := w.httpGet("/healthz", 2*time.Second); err != nil || st != 200 {
		t.Fatalf("/healthz: %d %v", st, err)
	}
	if st, _, err := w.httpGet("/readyz", 2*time.Second); err != nil || st != 200 {
		t.Fatalf("/readyz: %d %v", st, err)
	}
	established := w.dial("frontend", "backend", 8080)
	a.signal(syscall.SIGSTOP)
	a.waitState('T')
	w.probeExpect(deny("frontend", "backend", tcp, 8080)) // allowed by policy, but black-holed
	if !established.echo(probeTimeout) {
		t.Error("established connection must not depend on the agent")
	}
	out, _ := w.lab.NodeExec("cat", "/proc/net/netfilter/nfnetlink_queue")
	if f := strings.Fields(out); len(f) < 3 || f[2] == "0" {
		t.Errorf("expected packets waiting in queue 100 while the agent is stopped, got %q", out)
	}
	if _, _, err := w.httpGet("/healthz", 2*time.Second); err == nil {
		t.Error("/healthz answered while the agent was stopped")
	}
	a.signal(syscall.SIGCONT)
	w.probeExpect(allow("frontend", "backend", tcp, 8080))
	w.probeExpect(deny("other", "backend", tcp, 8080))
	time.Sleep(2 * time.Second) // a watchdog confusing the pause with a stall would act now
	if a.exited() {
		t.Fatalf("agent exited after SIGCONT; log:\n%s", a.log())
	}
	if st, body, err := w.httpGet("/healthz", 2*time.Second); err != nil || st != 200 {
		t.Errorf("/healthz after SIGCONT: %d %q %v", st, body, err)
	}
}

// Restart and double start leave exactly one set of rules; SIGTERM leaves none.
func TestRulesLifecycle(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "three-tier.yaml"))
	a := w.startAgent("--state", w.state)
	rules1, sets1, dump1 := w.sluiceRules()
	if rules1 == 0 || sets1 == 0 {
		t.Fatalf("no rules installed:\n%s", dump1)
	}
	// A second agent on the same queue cannot bind it and must not touch the first one's rules.
	b := w.spawnAgent("--state", w.state)
	if code := b.waitExit(20 * time.Second); code == 0 {
		t.Errorf("second agent on a busy queue exited 0; log:\n%s", b.log())
	}
	if !strings.Contains(b.log(), "bind NFQUEUE 100") {
		t.Errorf("second agent does not say why it failed:\n%s", b.log())
	}
	if rules, sets, dump := w.sluiceRules(); rules != rules1 || sets != sets1 {
		t.Errorf("double start changed the rules: %d/%d -> %d/%d\n%s", rules1, sets1, rules, sets, dump)
	}
	w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
	// Crash and restart: the leftovers are replaced, not duplicated.
	a.signal(syscall.SIGKILL)
	a.waitExit(5 * time.Second)
	c := w.startAgent("--state", w.state)
	if rules, sets, dump := w.sluiceRules(); rules != rules1 || sets != sets1 {
		t.Errorf("restart after a crash: %d/%d rules/sets, want %d/%d\n%s", rules, sets, rules1, sets1, dump)
	}
	w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
	c.signal(syscall.SIGTERM)
	if code := c.waitExit(10 * time.Second); code != 0 {
		t.Errorf("SIGTERM: exit code %d; log:\n%s", code, c.log())
	}
	if rules, sets, dump := w.sluiceRules(); rules != 0 || sets != 0 {
		t.Errorf("SIGTERM left %d rules and %d sets:\n%s", rules, sets, dump)
	}
	w.probeExpect(allow("other", "backend", tcp, 8080))
}

// Queue-all mode with two queues: every packet goes through sluice, replies are admitted by its
// own return table (so both directions of a connection must land on the same worker), and a
// malformed packet injected from a pod is dropped without harm.
func TestQueueAll(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "three-tier.yaml"))
	w.startAgent("--state", w.state, "--mode", "queue-all", "--queues", "2", "--fail-open=false")
	var flows []flow
	for _, sc := range seedScenarios(t) {
		if strings.HasPrefix(sc.name, "three-tier") {
			flows = sc.flows
		}
	}
	// Many connections between several address pairs, so both queues serve some (the queue is
	// a hash of the address pair); each exchanges data both ways.
	for i := 0; i < 6; i++ {
		flows = append(flows, allow("frontend", "backend", tcp, 8080), allow("backend", "database", tcp, 5432),
			v6(allow("frontend", "backend", tcp, 8080)), v6(allow("backend", "database", tcp, 5432)))
	}
	// UDP answers to clients isolated for ingress: nothing but the return table admits them,
	// so an answer hashed to the other worker than its query would be lost.
	for _, server := range []string{"coredns", "prometheus", "decoy"} {
		for _, client := range []string{"frontend", "database"} {
			flows = append(flows, allow(client, server, udp, 53), allow(client, server, udp, 53))
		}
	}
	w.check(flows)
	// Every reply must have found its connection in the table: a reply that missed it (on
	// the other worker, or never recorded) is dropped as belonging to no connection.
	if got := w.metric(`sluice_packets_total{reason="no-connection",verdict="drop"}`); got != 0 {
		t.Errorf("%v packets of accepted connections missed the return table", got)
	}
	c := w.dial("frontend", "backend", 8080)
	for i := 0; i < 5; i++ {
		if !c.echo(probeTimeout) {
			t.Fatalf("long-lived connection broke at exchange %d", i)
		}
	}
	if got := w.metric(`sluice_packets_total{reason="tracked",verdict="accept"}`); got == 0 {
		t.Error("no packet was accepted from the return table")
	}
	for _, q := range []string{"100", "101"} {
		if got := w.metric(`sluice_queue_waiting{queue="` + q + `"}`); got != 0 {
			t.Errorf("queue %s has %v packets waiting", q, got)
		}
	}
	out, _ := w.lab.NodeExec("cat", "/proc/net/netfilter/nfnetlink_queue")
	t.Logf("nfnetlink_queue:\n%s", out)

	// Malformed: an IPv4 header that is fine, followed by a TCP header cut to 10 bytes and a
	// UDP header claiming length 3. The kernel forwards them (conntrack marks them invalid) and
	// queue-all queues them.
	before := w.metric(`sluice_packets_total{reason="malformed",verdict="drop"}`)
	src, dst := w.addrs(flow{from: "other", to: "backend"})
	sendRaw(t, w, "other", ipv4Packet(src, dst, syscall.IPPROTO_TCP, []byte{0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0}))
	sendRaw(t, w, "other", ipv4Packet(src, dst, syscall.IPPROTO_UDP, []byte{0x9c, 0x40, 0x1f, 0x90, 0, 3, 0, 0}))
	deadline := time.Now().Add(5 * time.Second)
	for w.metric(`sluice_packets_total{reason="malformed",verdict="drop"}`) < before+2 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if got := w.metric(`sluice_packets_total{reason="malformed",verdict="drop"}`); got < before+2 {
		t.Errorf("malformed drops %v, want at least %v", got, before+2)
	}
	w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
}

func ipv4Packet(src, dst netip.Addr, proto int, payload []byte) []byte {
	b := make([]byte, 20+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8] = 64
	b[9] = byte(proto)
	copy(b[12:16], src.AsSlice())
	copy(b[16:20], dst.AsSlice())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(b[10:], ^uint16(sum))
	copy(b[20:], payload)
	return b
}

// sendRaw sends a complete IPv4 packet from a host with a raw socket.
func sendRaw(t *testing.T, w *world, from string, pkt []byte) {
	t.Helper()
	err := w.hosts[from].Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		var sa syscall.SockaddrInet4
		copy(sa.Addr[:], pkt[16:20])
		return syscall.Sendto(fd, pkt, 0, &sa)
	})
	if err != nil {
		t.Fatalf("raw send from %s: %v", from, err)
	}
}

// After a conntrack flush, the next packet of an established connection arrives as NEW. In
// this test it is the server's reply (the client is isolated for ingress and the server for
// egress, so only "a reply of a flow allowed the other way" admits it), then the client's next
// segment.
func TestConntrackFlushMidStream(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-all.yaml"), `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-to-backend, namespace: production}
spec:
  podSelector: {matchLabels: {tier: frontend}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {tier: backend}}}], ports: [{port: 7000}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-from-frontend, namespace: production}
spec:
  podSelector: {matchLabels: {tier: backend}}
  ingress: [{from: [{podSelector: {matchLabels: {tier: frontend}}}], ports: [{port: 7000}]}]
`)
	// The backend answers each byte after 1.2 s, long enough to flush conntrack in between.
	var ln net.Listener
	if err := w.hosts["backend"].Do(func() (err error) { ln, err = net.Listen("tcp", ":7000"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					time.Sleep(1200 * time.Millisecond)
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	w.startAgent("--state", w.state, "--fail-open=false")
	w.check([]flow{deny("backend", "frontend", tcp, 80), deny("other", "backend", tcp, 8080)})
	c := w.dial("frontend", "backend", 7000)
	if !c.echo(probeTimeout) {
		t.Fatal("connection does not work before the flush")
	}
	for i := 0; i < 3; i++ {
		msg := []byte{byte('a' + i)}
		c.c.SetDeadline(time.Now().Add(probeTimeout))
		if _, err := c.c.Write(msg); err != nil {
			t.Fatal(err)
		}
		time.Sleep(250 * time.Millisecond) // the byte and its ACK are through; the answer is not
		if out, err := w.lab.NodeExec("conntrack", "-F"); err != nil {
			t.Fatalf("conntrack -F: %v %s", err, out)
		}
		got := make([]byte, 1)
		if _, err := c.c.Read(got); err != nil || got[0] != msg[0] {
			t.Fatalf("round %d: the reply after the flush did not arrive: %v", i, err)
		}
	}
	// After the flush the connection's packets arrive as NEW: only sluice's own record of the
	// connection it accepted lets them through.
	if got := w.metric(`sluice_packets_total{reason="tracked",verdict="accept"}`); got == 0 {
		t.Error("no packet was accepted from the return table; the flush did not exercise it")
	}
	if !c.echo(probeTimeout) {
		t.Error("connection broken after the flushes")
	}
}

// A policy change that denies an established connection cuts it with --cut-established and
// keeps it without.
func TestPolicyChangeEstablished(t *testing.T) {
	for _, cut := range []bool{false, true} {
		name := map[bool]string{false: "kept by default", true: "cut with --cut-established"}[cut]
		t.Run(name, func(t *testing.T) {
			w := newWorld(t)
			w.writeState(example(t, "default-deny-ingress.yaml"), example(t, "allow-frontend.yaml"))
			args := []string{"--state", w.state, "--fail-open=false"}
			if cut {
				args = append(args, "--cut-established")
			}
			a := w.startAgent(args...)
			c := w.dial("frontend", "backend", 8080)
			if !c.echo(probeTimeout) {
				t.Fatal("connection does not work before the change")
			}
			w.reload(a, example(t, "default-deny-ingress.yaml"))
			if cut {
				a.waitLog("cutting established connection", 10*time.Second)
			}
			time.Sleep(300 * time.Millisecond)
			if got := c.echo(probeTimeout); got == cut {
				t.Errorf("after the change the connection works=%v, want %v", got, !cut)
			}
			w.check([]flow{deny("frontend", "backend", tcp, 8080)})
		})
	}
}

// Audit mode drops nothing and logs what it would drop, with the reason.
func TestAudit(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-ingress.yaml"))
	a := w.startAgent("--state", w.state, "--audit", "--fail-open=false")
	for _, f := range []flow{allow("prometheus", "frontend", tcp, 80), allow("other", "backend", udp, 53), allow("ext-web", "database", tcp, 5432)} {
		w.probeExpect(f)
	}
	a.waitLog(`msg="packet would be dropped (audit)" verdict=audit-drop src=monitoring/prometheus dst=production/frontend proto=TCP port=80 reason=ingress-denied`, 5*time.Second)
	a.waitLog(`src=production/other dst=production/backend proto=UDP port=53 reason=ingress-denied`, 5*time.Second)
	a.waitLog(`src=192.0.2.10 dst=production/database proto=TCP port=5432`, 5*time.Second)
	if !strings.Contains(a.log(), "policies=production/deny-all-ingress") {
		t.Errorf("audit lines do not name the isolating policy:\n%s", a.log())
	}
}

// A queue worker that hangs (fault injection: SLUICE_FAULT_STALL_PORT) fails /healthz within
// seconds and makes the agent exit, after which fail-open lets traffic through until the agent
// is restarted.
func TestStuckWorkerWatchdog(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "three-tier.yaml"))
	a := w.spawnAgentEnv([]string{"SLUICE_FAULT_STALL_PORT=9090"}, "--state", w.state, "--log-format", "json")
	a.waitLog(`"msg":"sluice agent running"`, 20*time.Second)
	w.check([]flow{deny("other", "backend", tcp, 8080)})
	stuckAt := time.Now()
	go w.lab.Probe(w.hosts["other"], netip.MustParseAddr("10.244.1.20"), tcp, 9090, 2*time.Second)
	deadline := time.Now().Add(8 * time.Second)
	for {
		st, body, err := w.httpGet("/healthz", time.Second)
		if err == nil && st == 503 && strings.Contains(body, "stuck") {
			t.Logf("/healthz failed %s after the stall: %s", time.Since(stuckAt).Round(100*time.Millisecond), strings.TrimSpace(body))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz still %d %q %v; log:\n%s", st, body, err, a.log())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if code := a.waitExit(20 * time.Second); code != 3 {
		t.Errorf("stuck agent exit code %d, want 3; log:\n%s", code, a.log())
	}
	t.Logf("agent exited %s after the stall", time.Since(stuckAt).Round(100*time.Millisecond))
	if !strings.Contains(a.log(), "exiting so that the supervisor restarts the agent") {
		t.Errorf("no exit reason in the log:\n%s", a.log())
	}
	if rules, _, _ := w.sluiceRules(); rules == 0 {
		t.Error("the watchdog exit must leave the rules (the restarted agent replaces them)")
	}
	// Dead agent + fail-open: everything passes, the policy-denied flow too.
	w.probeExpect(allow("other", "backend", tcp, 8080))
	// The supervisor's restart brings enforcement back.
	w.startAgent("--state", w.state)
	w.check([]flow{deny("other", "backend", tcp, 8080), allow("frontend", "backend", tcp, 8080)})
}
