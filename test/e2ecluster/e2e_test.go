// Package e2ecluster runs `sluice agent` in cluster mode against a real kube-apiserver (with
// etcd, through watch/kubetest) and enforces on the network-namespace lab with real packets: the
// seed's three-tier policies are applied through client-go and the real connections between the
// lab's pods change from allowed to dropped, and back when the policies are deleted.
package e2ecluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
	"github.com/sluice-dev/sluice/watch/kubetest"
)

const node = "node-1"

type pod struct {
	name   string
	labels map[string]string
	ip     netip.Addr
	port   uint16
	host   *netlab.Host
}

type flow struct {
	from, to string
	// allowed under the seed's three-tier policies (read by hand from the seed); every flow is
	// allowed without policies.
	withPolicies bool
}

// The seed's "Complete Example", flow by flow. The frontend is reachable from anywhere on 80,
// the backend only from the frontend on 8080, the database only from the backend on 5432;
// the frontend's egress allows the backend (and DNS) only, the backend's the database only.
var flows = []flow{
	{"frontend", "backend", true},
	{"backend", "database", true},
	{"internet", "frontend", true},
	{"frontend", "database", false}, // frontend egress: backend:8080 and DNS only
	{"internet", "backend", false},  // backend ingress: frontend only
	{"internet", "database", false}, // database ingress: backend only
	{"database", "backend", false},  // backend ingress: frontend only
	{"backend", "frontend", false},  // backend egress: database only
	{"database", "frontend", true},  // database has no egress policy; frontend takes anyone on 80
}

func repoRoot(t *testing.T) string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// cluster is a real API server with the seed's three-tier pods, and the lab they live in.
type cluster struct {
	t    *testing.T
	root string
	bin  string
	env  *kubetest.Env
	lab  *netlab.Lab
	pods map[string]*pod
	ctx  context.Context
}

func newCluster(t *testing.T) *cluster {
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and kernel rules: run it as root (make test does)")
	}
	c := &cluster{t: t, root: repoRoot(t)}
	c.bin = filepath.Join(t.TempDir(), "sluice")
	build := exec.Command("go", "build", "-o", c.bin, "./cmd/sluice")
	build.Dir = c.root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/sluice: %v\n%s", err, out)
	}
	c.env = kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	c.ctx = ctx

	c.lab = netlab.NewT(t)
	c.pods = map[string]*pod{
		"frontend": {name: "frontend", labels: map[string]string{"app": "frontend", "tier": "frontend"}, ip: netip.MustParseAddr("10.244.1.10"), port: 80},
		"backend":  {name: "backend", labels: map[string]string{"app": "backend", "tier": "backend"}, ip: netip.MustParseAddr("10.244.1.11"), port: 8080},
		"database": {name: "database", labels: map[string]string{"app": "postgres", "tier": "database"}, ip: netip.MustParseAddr("10.244.1.12"), port: 5432},
		"internet": {name: "internet", ip: netip.MustParseAddr("203.0.113.50")}, // outside the cluster
	}
	for _, p := range c.pods {
		add := c.lab.AddHost
		if p.labels == nil {
			add = c.lab.AddOutside
		}
		h, err := add(p.name, p.ip)
		if err != nil {
			t.Fatal(err)
		}
		p.host = h
		if p.port != 0 {
			if err := h.Serve(netlab.TCP, p.port); err != nil {
				t.Fatal(err)
			}
		}
	}
	client := c.env.Client
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "production", Labels: map[string]string{"env": "production"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range c.pods {
		if p.labels == nil {
			continue
		}
		created, err := client.CoreV1().Pods("production").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "production", Labels: p.labels},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1",
				Ports: []corev1.ContainerPort{{Name: "service", ContainerPort: int32(p.port)}}}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip.String(), PodIPs: []corev1.PodIP{{IP: p.ip.String()}}}
		if _, err := client.CoreV1().Pods("production").UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The agent runs in the lab's node namespace, whose 127.0.0.1 is its own; a forwarder
	// listening there on the API server's port carries the (TLS) bytes to the real one, so the
	// kubeconfig and its certificates work unchanged.
	forwardAPIServer(t, c.lab, c.env)
	return c
}

func (c *cluster) probe(f flow) bool {
	from, to := c.pods[f.from], c.pods[f.to]
	ok, err := c.lab.Probe(from.host, to.ip, netlab.TCP, to.port, 700*time.Millisecond)
	if err != nil {
		c.t.Fatalf("probe %s -> %s:%d: %v", f.from, f.to, to.port, err)
	}
	return ok
}

// waitAll probes every flow until each gives want(f), within a bounded time, and returns how
// long it took.
func (c *cluster) waitAll(agent *agentProc, what string, want func(flow) bool) time.Duration {
	c.t.Helper()
	start := time.Now()
	deadline := start.Add(45 * time.Second)
	for {
		var wrong []string
		for _, f := range flows {
			if got := c.probe(f); got != want(f) {
				wrong = append(wrong, fmt.Sprintf("%s->%s:%d got allowed=%v", f.from, f.to, c.pods[f.to].port, got))
			}
		}
		if len(wrong) == 0 {
			d := time.Since(start)
			c.t.Logf("%s: all %d flows as expected after %v", what, len(flows), d.Round(time.Millisecond))
			return d
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: after 45 s still wrong: %s\nagent log:\n%s", what, strings.Join(wrong, "; "), agent.tail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *cluster) createPolicies() []networkingv1.NetworkPolicy {
	c.t.Helper()
	policies := seedThreeTier(c.t, filepath.Join(c.root, "deploy", "examples", "three-tier.yaml"))
	for i := range policies {
		if _, err := c.env.Client.NetworkingV1().NetworkPolicies("production").Create(c.ctx, &policies[i], metav1.CreateOptions{}); err != nil {
			c.t.Fatalf("creating %s: %v", policies[i].Name, err)
		}
	}
	c.t.Logf("applied %d seed policies through client-go", len(policies))
	return policies
}

func TestAgentClusterModeEnforcesSeedThreeTier(t *testing.T) {
	c := newCluster(t)
	agent := startAgent(t, c.lab, c.bin, c.env.Kubeconfig)
	agent.waitReady(t, c.lab, 60*time.Second)

	c.waitAll(agent, "no policies: every connection allowed", func(flow) bool { return true })

	applied := time.Now()
	policies := c.createPolicies()
	// Real-packet propagation: from the first create call until a new frontend -> database
	// connection is dropped (probes with a short timeout, so the figure is within ~250 ms).
	fe, db := c.pods["frontend"], c.pods["database"]
	for {
		ok, err := c.lab.Probe(fe.host, db.ip, netlab.TCP, db.port, 250*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			t.Logf("policy create -> first dropped frontend->database connection: %v (real packets, 250 ms probe timeout included)", time.Since(applied).Round(time.Millisecond))
			break
		}
		if time.Since(applied) > 45*time.Second {
			t.Fatalf("frontend -> database still connects 45 s after the policies were created:\n%s", agent.tail())
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.waitAll(agent, "three-tier policies applied", func(f flow) bool { return f.withPolicies })
	if !strings.Contains(agent.tail(), "production/database") {
		t.Errorf("the agent logged no drop naming production/database; log:\n%s", agent.tail())
	}

	for _, p := range policies {
		if err := c.env.Client.NetworkingV1().NetworkPolicies("production").Delete(c.ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c.waitAll(agent, "policies deleted: every connection allowed again", func(flow) bool { return true })

	agent.stop(t)
}

// A fail-closed agent is replaced (an upgrade) while the API server is down, as when a node
// reboots during an outage: the rules stay in place through the gap, and the new agent enforces
// the last policy it knew at once, from the node's state store, without the API server. When the
// API server returns, the agent follows it again.
func TestRestartWithAPIServerDownEnforcesLastKnownPolicy(t *testing.T) {
	c := newCluster(t)
	store := filepath.Join(t.TempDir(), "var-lib-sluice", "state")
	first := startAgent(t, c.lab, c.bin, c.env.Kubeconfig, "--fail-open=false", "--state-store", store)
	first.waitReady(t, c.lab, 60*time.Second)
	c.createPolicies()
	c.waitAll(first, "first agent: three-tier policies in force", func(f flow) bool { return f.withPolicies })
	first.stop(t) // SIGTERM: the state is written once more on the way out
	if _, err := os.Stat(store); err != nil {
		t.Fatalf("no state store after the first agent: %v\n%s", err, first.tail())
	}
	// Fail-closed, no agent: the rules stayed, so nothing passes, allowed or not.
	if f := flows[0]; c.probe(f) {
		t.Errorf("with no agent and --fail-open=false, %s -> %s got through: the rules did not stay", f.from, f.to)
	}

	c.env.StopAPIServer()
	second := startAgent(t, c.lab, c.bin, c.env.Kubeconfig, "--fail-open=false", "--state-store", store)
	second.waitReady(t, c.lab, 30*time.Second)
	c.waitAll(second, "second agent, API server down: the last known policy in force", func(f flow) bool { return f.withPolicies })
	if !strings.Contains(second.tail(), "enforcing the last known policy") {
		t.Errorf("the second agent does not say it enforces the last known policy:\n%s", second.tail())
	}

	c.env.StartAPIServer()
	for _, np := range []string{"frontend-policy", "backend-policy", "database-policy"} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			err := c.env.Client.NetworkingV1().NetworkPolicies("production").Delete(c.ctx, np, metav1.DeleteOptions{})
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("deleting %s after the API server came back: %v", np, err)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	c.waitAll(second, "API server back, policies deleted: the agent follows it again", func(flow) bool { return true })
	second.stop(t)
	if out, err := c.lab.NodeExec(c.bin, "agent", "--cleanup", "--lock-file", filepath.Join(t.TempDir(), "lock")); err != nil {
		t.Errorf("cleanup: %v %s", err, out)
	}
}

// seedThreeTier reads the seed's three-tier NetworkPolicies (deploy/examples).
func seedThreeTier(t *testing.T, path string) []networkingv1.NetworkPolicy {
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the seed's three-tier policies: %v", err)
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var out []networkingv1.NetworkPolicy
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil || tm.Kind != "NetworkPolicy" {
			continue
		}
		var np networkingv1.NetworkPolicy
		if err := yaml.UnmarshalStrict(doc, &np); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, np)
	}
	if len(out) != 3 {
		t.Fatalf("%s: %d NetworkPolicies, want the seed's 3", path, len(out))
	}
	return out
}

func forwardAPIServer(t *testing.T, lab *netlab.Lab, env *kubetest.Env) {
	u, err := url.Parse(env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	target := u.Host
	var ln net.Listener
	if err := lab.Node().Do(func() error {
		var err error
		ln, err = net.Listen("tcp", target)
		return err
	}); err != nil {
		t.Fatalf("listening on %s in the node namespace: %v", target, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target) // this goroutine is in the test's namespace
			if err != nil {
				in.Close()
				continue
			}
			wg.Add(2)
			pipe := func(a, b net.Conn) {
				defer wg.Done()
				io.Copy(a, b)
				a.Close()
				b.Close()
			}
			go pipe(in, out)
			go pipe(out, in)
		}
	}()
}

// agentProc is the agent under test, started in the lab's node namespace.
type agentProc struct {
	*agentproc.Proc
}

func (a *agentProc) tail() string { return a.Tail(6000) }

func startAgent(t *testing.T, lab *netlab.Lab, bin, kubeconfig string, extra ...string) *agentProc {
	args := []string{"agent", "--kubeconfig", kubeconfig, "--node", node,
		"--queue-num", "180", "--metrics-addr", agentproc.DefaultMetricsAddr, "--log-format", "text",
		"--pod-interfaces", lab.PodInterfaces(), "--state-store", filepath.Join(t.TempDir(), "state")}
	p, err := agentproc.Start(lab.NodeCommand(bin, append(args, extra...)...))
	if err != nil {
		t.Fatal(err)
	}
	a := &agentProc{p}
	t.Cleanup(func() {
		a.Stop(15 * time.Second)
		if t.Failed() {
			t.Logf("agent log:\n%s", a.tail())
		}
	})
	return a
}

// waitReady polls /readyz inside the node namespace.
func (a *agentProc) waitReady(t *testing.T, lab *netlab.Lab, wait time.Duration) {
	d, err := a.WaitReady(lab.Node().Do, agentproc.DefaultMetricsAddr, wait)
	if err != nil {
		t.Fatalf("%v:\n%s", err, a.tail())
	}
	t.Logf("agent ready (cluster mode, first snapshot from the API server) after %v", d.Round(time.Millisecond))
}

func (a *agentProc) stop(t *testing.T) {
	a.Signal(syscall.SIGTERM)
	code, err := a.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("the agent did not exit within 20 s of SIGTERM:\n%s", a.tail())
	}
	if code != 0 {
		t.Errorf("agent exit code %d after SIGTERM:\n%s", code, a.tail())
	}
}
