package e2e

import (
	"strings"
	"testing"
	"time"
)

// With a bridge CNI, traffic between pods of one node is switched by the bridge and reaches
// iptables only when br_netfilter hands it over (net.bridge.bridge-nf-call-iptables, per
// network namespace). The agent must refuse readiness while that is off, say why, and turn ready
// once it is on; with --set-bridge-nf-call it turns it on itself.
func TestBridgedPodInterfacesNeedBridgeNetfilter(t *testing.T) {
	w := newWorld(t)
	w.writeState(example(t, "default-deny-all.yaml"))
	br := w.lab.ID + "h0" // matches the lab's pod-interface pattern, as cni0 would be listed
	for _, args := range [][]string{
		{"link", "add", br, "type", "bridge"},
		{"link", "set", w.hosts["database"].Veth, "master", br},
		{"link", "set", br, "up"},
	} {
		if out, err := w.lab.NodeExec("ip", args...); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	sysctl := "/proc/sys/net/bridge/bridge-nf-call-iptables"
	set := func(v string) {
		t.Helper()
		if out, err := w.lab.NodeExec("sh", "-c", "echo "+v+" > "+sysctl); err != nil {
			t.Fatalf("set %s=%s: %v %s", sysctl, v, err, out)
		}
	}
	get := func() string {
		out, _ := w.lab.NodeExec("cat", sysctl)
		return strings.TrimSpace(out)
	}
	waitReady := func(want int) string {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		var body string
		for {
			st, b, err := w.httpGet("/readyz", time.Second)
			body = b
			if err == nil && st == want {
				return body
			}
			if time.Now().After(deadline) {
				t.Fatalf("/readyz: %d %q %v, want %d", st, body, err, want)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	set("0")
	a := w.startAgent("--state", w.state, "--resync-interval=1s")
	body := waitReady(503)
	if !strings.Contains(body, "bridge-nf-call-iptables") || !strings.Contains(body, w.hosts["database"].Veth) {
		t.Errorf("/readyz does not say which bridged interface needs which sysctl: %q", body)
	}
	if !strings.Contains(a.log(), "bridged pod traffic would skip sluice") {
		t.Errorf("no log line about the bridge:\n%s", a.log())
	}
	set("1")
	waitReady(200)
	a.stop()

	// Asked to, the agent turns the sysctl on itself.
	set("0")
	w.startAgent("--state", w.state, "--resync-interval=1s", "--set-bridge-nf-call")
	waitReady(200)
	if v := get(); v != "1" {
		t.Errorf("%s = %s after --set-bridge-nf-call, want 1", sysctl, v)
	}
}
