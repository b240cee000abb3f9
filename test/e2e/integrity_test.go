package e2e

// Node integrity (issue 13), with real packets: sluice shares the node's chains with other
// components, restarts, and meets stale pod objects; none of that may switch enforcement off or
// override what others enforce.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Item 1: sluice's accept means "policy allows"; a DROP or REJECT that the operator (or
// kube-proxy) placed after sluice's jump still applies to a flow the policy allows, the offload
// set's verdicts included.
func TestIntegrityLaterRulesApply(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "allow-frontend.yaml"))
	fe, be := w.addrs(flow{from: "frontend", to: "backend"})
	server := w.addrPort("backend", false, 8080)
	match := []string{"FORWARD", "-s", fe.String(), "-d", be.String(), "-p", "tcp", "--dport", "8080"}
	drop := append(append([]string(nil), match...), "-j", "DROP")
	reject := append(append([]string(nil), match...), "-j", "REJECT", "--reject-with", "tcp-reset")
	try := func() error { return exchange(w.hosts["frontend"], 0, server, probeTimeout) }
	// expect adds rule, checks what the allowed flow does, and removes the rule. The rule
	// must stop the connection at its first packet: a SYN that reached the backend skipped it
	// (only the packets after it would then meet the rule).
	expect := func(w *world, rule []string, what string, ok func(error) bool) {
		w.t.Helper()
		w.ipt(false, append([]string{"-A"}, rule...)...)
		defer w.ipt(false, append([]string{"-D"}, rule...)...)
		syns := w.captureFunc("backend", synTo(fe, be, 8080))
		defer syns.Close()
		err := try()
		n := len(syns.Packets())
		if !ok(err) || n > 0 {
			out, _ := w.lab.NodeExec("iptables-"+w.iptBackend(), "-S", "FORWARD")
			w.t.Errorf("frontend -> backend:8080 (allowed by policy) with %s appended to FORWARD: got %v, and %d SYNs reached the backend\nFORWARD:\n%s", what, err, n, out)
		}
	}
	dropped := func(err error) bool { return err != nil && isTimeout(err) }
	refused := func(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

	t.Run("control: no agent", func(t *testing.T) {
		w := w.sub(t)
		expect(w, drop, "a DROP", dropped)
		expect(w, reject, "a REJECT", refused)
		if err := try(); err != nil {
			t.Fatalf("frontend -> backend:8080 without rules: %v", err)
		}
	})
	for _, offload := range []bool{false, true} {
		name := map[bool]string{false: "agent", true: "agent with offload"}[offload]
		t.Run(name, func(t *testing.T) {
			w := w.sub(t)
			args := []string{"--state", w.state, w.podIfaces()}
			if offload {
				args = append(args, "--offload")
			}
			w.startAgent(w.agentArgs(args...)...)
			w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
			if offload {
				// The verdict reaches the kernel set asynchronously; the next connections are
				// decided there.
				deadline := time.Now().Add(5 * time.Second)
				for w.metric("sluice_offload_added_total") == 0 && time.Now().Before(deadline) {
					time.Sleep(100 * time.Millisecond)
				}
				if w.metric("sluice_offload_added_total") == 0 {
					t.Fatal("the allowed flow was never offloaded")
				}
			}
			expect(w, drop, "a DROP after sluice's jump", dropped)
			expect(w, reject, "a REJECT after sluice's jump", refused)
			if err := try(); err != nil {
				t.Errorf("frontend -> backend:8080 once the rules are gone: %v", err)
			}
		})
	}
}

// synTo matches an IPv4 TCP SYN (without ACK) from src to dst:port.
func synTo(src, dst netip.Addr, port uint16) func([]byte) bool {
	return func(p []byte) bool {
		if len(p) < 20 || p[0]>>4 != 4 || p[9] != syscall.IPPROTO_TCP {
			return false
		}
		ihl := int(p[0]&0x0f) * 4
		if len(p) < ihl+14 || !bytes.Equal(p[12:16], src.AsSlice()) || !bytes.Equal(p[16:20], dst.AsSlice()) {
			return false
		}
		return binary.BigEndian.Uint16(p[ihl+2:]) == port && p[ihl+13]&0x12 == 0x02
	}
}

// sluiceFirst reports whether the first rule of chain (filter table) jumps to a SLUICE chain.
func (w *world) sluiceFirst(chain string) (bool, string) {
	w.t.Helper()
	out, _ := w.lab.NodeExec("iptables-"+w.iptBackend(), "-w", "5", "-S", chain)
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A "+chain+" ") {
			return strings.Contains(l, "-j SLUICE-"), out
		}
	}
	return false, out
}

// Item 2: the agent keeps its jumps present and first. A kube-proxy-like KUBE-FORWARD jump
// (accepting masquerade-marked packets) inserted above sluice's after it started, and sluice's
// own jump deleted (a firewalld reload, an iptables-restore without --noflush), are each
// repaired within the resync interval. Right after each change, before the repair, the denied
// flow goes through: that is the control that shows the change is an attack.
func TestIntegrityResync(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "allow-frontend.yaml"))
	denied := w.addrPort("backend", false, 8080)
	other, _ := w.hosts["other"].Addr(false)
	const resync = 2 * time.Second
	w.startAgent(w.agentArgs("--state", w.state, w.podIfaces(), fmt.Sprintf("--resync-interval=%s", resync))...)
	w.check([]flow{deny("other", "backend", tcp, 8080), allow("frontend", "backend", tcp, 8080)})
	// kube-proxy marks packets it will masquerade (hairpin, external traffic to a Service);
	// here everything from "other" carries that mark.
	w.ipt(false, "-t", "mangle", "-A", "PREROUTING", "-s", other.String(), "-j", "MARK", "--set-xmark", "0x4000/0x4000")
	w.ipt(false, "-N", "KUBE-FORWARD")
	w.ipt(false, "-A", "KUBE-FORWARD", "-m", "mark", "--mark", "0x4000/0x4000", "-j", "ACCEPT")

	for _, c := range []struct {
		name   string
		change []string
	}{
		{"KUBE-FORWARD inserted above sluice", []string{"-I", "FORWARD", "1", "-j", "KUBE-FORWARD"}},
		{"sluice's FORWARD jump deleted", []string{"-D", "FORWARD", "-j", "SLUICE-FORWARD"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := w.sub(t)
			t.Cleanup(func() {
				// Each case on its own: no KUBE-FORWARD jump survives into the next one.
				for {
					if _, err := w.lab.NodeExec("iptables-"+w.iptBackend(), "-w", "5", "-D", "FORWARD", "-j", "KUBE-FORWARD"); err != nil {
						return
					}
				}
			})
			before := w.metric("sluice_rules_repaired_total")
			// Control: right after the change the denied flow works. The agent may repair in the
			// few milliseconds between the change and the probe; then the change is made again.
			worked := false
			for i := 0; i < 3 && !worked; i++ {
				w.ipt(false, c.change...)
				err := exchange(w.hosts["other"], 0, denied, time.Second)
				worked = err == nil
				if first, _ := w.sluiceFirst("FORWARD"); !worked && !first {
					t.Errorf("control: right after the change the denied flow other -> backend:8080 still fails (%v): the change is no attack", err)
					break
				}
			}
			if !worked {
				return
			}
			deadline := time.Now().Add(3*resync + 2*time.Second)
			first, chain := w.sluiceFirst("FORWARD")
			for !first && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
				first, chain = w.sluiceFirst("FORWARD")
			}
			if !first {
				t.Errorf("%s after the change sluice's jump is still not first in FORWARD:\n%s", 3*resync+2*time.Second, chain)
			}
			if err := exchange(w.hosts["other"], 0, denied, probeTimeout); err == nil || !isTimeout(err) {
				t.Errorf("after the repair window the denied flow other -> backend:8080: %v; want dropped", err)
			}
			if v := w.pollMetric("sluice_rules_repaired_total", before, 3*resync); v <= before {
				t.Errorf("sluice_rules_repaired_total is %v, not above %v, after the repair", v, before)
			}
		})
	}
}

// Item 3: with --fail-open=false, SIGTERM leaves the rules in place: while no agent runs, a
// denied connection fails (and an allowed one too: nobody reads the queue); the next agent
// adopts the rules instead of duplicating them.
func TestIntegrityFailClosedRestart(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "allow-frontend.yaml"))
	args := w.agentArgs("--state", w.state, "--fail-open=false", w.podIfaces())
	a := w.startAgent(args...)
	w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
	rules, sets, dump := w.sluiceRules()
	a.signal(syscall.SIGTERM)
	if code := a.waitExit(10 * time.Second); code != 0 {
		t.Errorf("SIGTERM: exit code %d", code)
	}
	if r, s, d := w.sluiceRules(); r != rules || s != sets {
		t.Errorf("after SIGTERM with --fail-open=false: %d rules and %d sets, want the %d and %d installed\nbefore:\n%s\nafter:\n%s", r, s, rules, sets, dump, d)
	}
	w.probeExpect(deny("other", "backend", tcp, 8080))
	w.probeExpect(deny("frontend", "backend", tcp, 8080)) // allowed by policy, but no agent
	w.startAgent(args...)
	if r, s, d := w.sluiceRules(); r != rules || s != sets {
		t.Errorf("the next agent: %d rules and %d sets, want %d and %d (adopted, not duplicated)\n%s", r, s, rules, sets, d)
	}
	w.check([]flow{allow("frontend", "backend", tcp, 8080), deny("other", "backend", tcp, 8080)})
}

// podDoc is a Pod document for the state file, beside the world's pods.
func podDoc(ns, name, node, ip string, terminating bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n  namespace: %s\n", name, ns)
	if terminating {
		b.WriteString("  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n  deletionGracePeriodSeconds: 30\n")
	}
	fmt.Fprintf(&b, "spec:\n  nodeName: %s\n  containers:\n  - name: c\n    image: busybox\n", node)
	fmt.Fprintf(&b, "status:\n  phase: Running\n  podIP: %q\n  podIPs:\n  - ip: %q\n", ip, ip)
	return b.String()
}

// Item 4: a duplicate of a local pod's address (a remote pod whose stale status still lists it,
// as with VPC-style IP reuse, or a terminating local pod) must not unisolate the local, running
// pod, either way. The duplicates are named to sort first in (namespace, name) order.
func TestIntegrityDuplicateAddress(t *testing.T) {
	w := newWorld(t)
	w.node = "node-a"
	w.nodes = map[string]string{}
	for _, p := range pods {
		w.nodes[p.name] = "node-a"
	}
	db, _ := w.hosts["database"].Addr(false)
	isolated := []flow{
		deny("database", "decoy", tcp, 80),      // its egress
		deny("decoy", "database", tcp, 5432),    // its ingress
		allow("decoy", "prometheus", tcp, 9090), // others are untouched
	}
	w.writeState(example(t, "default-deny-all.yaml"), podDoc("default", "aaa-ghost", "node-b", db.String(), false))
	a := w.startAgent(w.agentArgs("--state", w.state, "--node", "node-a", w.podIfaces())...)
	t.Run("remote duplicate", func(t *testing.T) { w.sub(t).check(isolated) })
	t.Run("terminating local duplicate", func(t *testing.T) {
		w := w.sub(t)
		w.reload(a, example(t, "default-deny-all.yaml"), podDoc("default", "aaa-leaving", "node-a", db.String(), true))
		w.check(isolated)
	})
}
