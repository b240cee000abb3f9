package e2ek8s

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNodeSmoke runs `hack/e2e-k8s.sh smoke`: a whole node (control plane, containerd, kubelet,
// kube-proxy) in one network namespace; a policy the intruder pod gets through while no enforcer
// runs (the control); sluice installed from deploy/ as a DaemonSet of the locally built image;
// then one allowed and one dropped connection between real pods, and the drop in the
// DaemonSet's `kubectl logs`. The script restores everything it changed on exit; the
// test then checks nothing of the node is left.
func TestNodeSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the node needs network namespaces, mounts and cgroups: run as root (make test does)")
	}
	root := repoRoot(t)
	before := machineState(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "hack", "e2e-k8s.sh"), "smoke")
	cmd.Dir = root
	// On the test's time-out the script gets SIGTERM and runs its cleanup stack.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 2 * time.Minute
	var out bytes.Buffer
	logf, err := os.Create(filepath.Join(t.TempDir(), "smoke.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout = io.MultiWriter(&out, logf)
	cmd.Stderr = io.MultiWriter(&out, logf)
	err = cmd.Run()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	last := lines[len(lines)-1]
	if err != nil || last != "smoke: 5 passed, 0 failed" {
		t.Fatalf("hack/e2e-k8s.sh smoke: %v, last line %q; output:\n%s", err, last, tailString(out.String(), 12000))
	}
	for _, l := range lines {
		if strings.Contains(l, "phase ") || strings.Contains(l, "ok: ") || strings.Contains(l, "installed from deploy") {
			t.Log(l)
		}
	}
	if after := machineState(t); after != before {
		t.Errorf("the run left the machine changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// machineState is what a node run may touch outside its namespace: namespaces, mounts and
// cgroups of its own, and the kernel settings the kubelet writes.
func machineState(t *testing.T) string {
	var b strings.Builder
	ns, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(ns), "\n") {
		if strings.HasPrefix(l, "sluice-k8s") {
			b.WriteString("netns " + l + "\n")
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && (strings.HasPrefix(f[4], "/var/lib/sluice-k8s") || strings.HasPrefix(f[4], "/run/sluice-k8s")) {
			b.WriteString("mount " + f[4] + "\n")
		}
	}
	cg, _ := filepath.Glob("/sys/fs/cgroup/*/sluice-k8s")
	for _, d := range cg {
		b.WriteString("cgroup " + d + "\n")
	}
	for _, k := range []string{"kernel/panic_on_oops", "kernel/panic", "vm/overcommit_memory", "vm/panic_on_oom", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"} {
		v, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(k + "=" + strings.TrimSpace(string(v)) + "\n")
	}
	return b.String()
}

func tailString(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
