// Package e2e runs the real sluice binary as an agent inside a network-namespace lab and checks
// its verdicts with real TCP, UDP and SCTP connections between pod namespaces. It needs root
// (namespaces, iptables, NFQUEUE); it fails, never skips, without it.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
	"github.com/sluice-dev/sluice/policy"
)

var sluiceBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sluice-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	sluiceBin = filepath.Join(dir, "sluice")
	build := exec.Command("go", "build", "-o", sluiceBin, "github.com/sluice-dev/sluice/cmd/sluice")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building sluice failed:", err)
		os.RemoveAll(dir)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// pod describes a pod of the test cluster; its addresses become a lab host.
type pod struct {
	ns, name string
	labels   map[string]string
	ips      []string
}

// outside is a host that is not a pod (an ipBlock peer).
type outside struct {
	name string
	ip   string
}

var namespaces = map[string]map[string]string{
	"production":  {"env": "production"},
	"monitoring":  {"purpose": "monitoring"},
	"kube-system": {},
	"default":     {},
}

var pods = []pod{
	{"production", "frontend", map[string]string{"app": "frontend", "tier": "frontend"}, []string{"10.244.1.10", "fd00:244::10"}},
	{"production", "backend", map[string]string{"app": "backend", "tier": "backend"}, []string{"10.244.1.11", "fd00:244::11"}},
	{"production", "database", map[string]string{"app": "database", "tier": "database"}, []string{"10.244.1.12", "fd00:244::12"}},
	{"production", "other", nil, []string{"10.244.1.13", "fd00:244::13"}},
	{"monitoring", "prometheus", map[string]string{"app": "prometheus"}, []string{"10.244.1.20"}},
	{"kube-system", "coredns", map[string]string{"k8s-app": "kube-dns"}, []string{"10.244.1.30"}},
	// Same labels as the frontend in another namespace: podSelector-only peers must not match it.
	{"default", "decoy", map[string]string{"app": "frontend", "tier": "frontend"}, []string{"10.244.1.40"}},
}

var outsiders = []outside{
	{"ext-db", "10.0.0.5"},    // inside the seed's ipBlock 10.0.0.0/24
	{"ext-web", "192.0.2.10"}, // outside it
	{"ext-web6", "2001:db8::10"},
}

// Ports every host serves.
var (
	tcpPorts  = []uint16{80, 8080, 5432, 9090}
	udpPorts  = []uint16{53}
	sctpPorts = []uint16{3868}
)

// clusterYAML renders the namespaces and pods as a state file, followed by policy documents.
func clusterYAML(policies ...string) string { return clusterYAMLOn(nil, policies...) }

// clusterYAMLOn is clusterYAML with spec.nodeName set from nodes (pod name -> node).
func clusterYAMLOn(nodes map[string]string, policies ...string) string {
	var b strings.Builder
	for _, ns := range []string{"production", "monitoring", "kube-system", "default"} {
		fmt.Fprintf(&b, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n  labels:\n", ns)
		fmt.Fprintf(&b, "    kubernetes.io/metadata.name: %s\n", ns)
		for k, v := range namespaces[ns] {
			fmt.Fprintf(&b, "    %s: %s\n", k, v)
		}
		b.WriteString("---\n")
	}
	for _, p := range pods {
		fmt.Fprintf(&b, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: %s\n  namespace: %s\n", p.name, p.ns)
		if len(p.labels) > 0 {
			b.WriteString("  labels:\n")
			for k, v := range p.labels {
				fmt.Fprintf(&b, "    %s: %s\n", k, v)
			}
		}
		b.WriteString("spec:\n")
		if n := nodes[p.name]; n != "" {
			fmt.Fprintf(&b, "  nodeName: %s\n", n)
		}
		b.WriteString("  containers:\n  - name: c\n    image: busybox\nstatus:\n  phase: Running\n")
		fmt.Fprintf(&b, "  podIP: %q\n  podIPs:\n", p.ips[0])
		for _, ip := range p.ips {
			fmt.Fprintf(&b, "  - ip: %q\n", ip)
		}
		b.WriteString("---\n")
	}
	for _, pol := range policies {
		b.WriteString(strings.TrimSpace(pol))
		b.WriteString("\n---\n")
	}
	return b.String()
}

// example reads a policy file of deploy/examples (the seed's policies).
func example(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", name))
	if err != nil {
		t.Fatalf("seed example: %v", err)
	}
	return string(b)
}

// world is a lab with every pod and outside host, all serving.
type world struct {
	t     *testing.T
	lab   *netlab.Lab
	hosts map[string]*netlab.Host
	dir   string
	state string
	// node and nodes: --node of the agent and the pods' spec.nodeName (empty: every pod local).
	node  string
	nodes map[string]string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{t: t, lab: netlab.NewT(t), hosts: map[string]*netlab.Host{}, dir: t.TempDir()}
	w.state = filepath.Join(w.dir, "state.yaml")
	add := func(name string, ips []string, isPod bool) {
		var addrs []netip.Addr
		for _, s := range ips {
			addrs = append(addrs, netip.MustParseAddr(s))
		}
		addHost := w.lab.AddOutside
		if isPod {
			addHost = w.lab.AddHost
		}
		h, err := addHost(name, addrs...)
		if err != nil {
			t.Fatal(err)
		}
		w.hosts[name] = h
		for _, p := range tcpPorts {
			if err := h.Serve(netlab.TCP, p); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range udpPorts {
			if err := h.Serve(netlab.UDP, p); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range sctpPorts {
			if err := h.Serve(netlab.SCTP, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, p := range pods {
		add(p.name, p.ips, true)
	}
	for _, o := range outsiders {
		add(o.name, []string{o.ip}, false)
	}
	return w
}

// podInterfaces lists the node side of the named hosts' veths, for --pod-interfaces.
func (w *world) podInterfaces(hosts ...string) string {
	var names []string
	for _, h := range hosts {
		names = append(names, w.hosts[h].Veth)
	}
	return strings.Join(names, ",")
}

// writeState replaces the state file atomically (as kubectl > tmp && mv would).
func (w *world) writeState(policies ...string) {
	w.t.Helper()
	tmp := w.state + ".tmp"
	if err := os.WriteFile(tmp, []byte(clusterYAMLOn(w.nodes, policies...)), 0o644); err != nil {
		w.t.Fatal(err)
	}
	if err := os.Rename(tmp, w.state); err != nil {
		w.t.Fatal(err)
	}
}

// snapshot compiles the current state file the way the agent does (w.node is its --node).
func (w *world) snapshot() *policy.Snapshot {
	w.t.Helper()
	st, _, err := policy.LoadFile(w.state)
	if err != nil {
		w.t.Fatal(err)
	}
	s, err := policy.Compile(st, policy.Options{Node: w.node})
	if err != nil {
		w.t.Fatal(err)
	}
	return s
}

// flow is one probe and its expected outcome.
type flow struct {
	from, to string
	proto    netlab.Proto
	port     uint16
	v6       bool
	want     bool
}

func (f flow) String() string {
	fam := ""
	if f.v6 {
		fam = " (IPv6)"
	}
	verdict := "dropped"
	if f.want {
		verdict = "allowed"
	}
	return fmt.Sprintf("%s -> %s %v/%d%s should be %s", f.from, f.to, f.proto, f.port, fam, verdict)
}

func (w *world) addrs(f flow) (src, dst netip.Addr) {
	w.t.Helper()
	fh, th := w.hosts[f.from], w.hosts[f.to]
	if fh == nil || th == nil {
		w.t.Fatalf("unknown host in %v", f)
	}
	src, ok1 := fh.Addr(f.v6)
	dst, ok2 := th.Addr(f.v6)
	if !ok1 || !ok2 {
		w.t.Fatalf("%v: a host lacks an address of that family", f)
	}
	return src, dst
}

const (
	probeTimeout = 3 * time.Second
	parallel     = 8
)

// check probes every flow with real connections (in parallel, bounded) and reports each one
// that does not behave as expected. Before probing it checks that the expectation agrees with
// the policy engine, so a wrong expectation is told apart from a wrong dataplane.
func (w *world) check(flows []flow) {
	w.t.Helper()
	snap := w.snapshot()
	for _, f := range flows {
		src, dst := w.addrs(f)
		v := snap.Decide(policy.Flow{Src: src, Dst: dst, Proto: f.proto, Port: f.port})
		if v.Allowed != f.want {
			w.t.Errorf("expectation disagrees with the policy engine (engine: allowed=%v, %v): %v", v.Allowed, v.Reason, f)
		}
	}
	type result struct {
		f   flow
		ok  bool
		err error
	}
	results := make([]result, len(flows))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i, f := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			_, dst := w.addrs(f)
			ok, err := w.lab.Probe(w.hosts[f.from], dst, f.proto, f.port, probeTimeout)
			results[i] = result{f, ok, err}
		}()
	}
	wg.Wait()
	for _, r := range results {
		switch {
		case r.err != nil:
			w.t.Errorf("%v: probe error: %v", r.f, r.err)
		case r.ok != r.f.want:
			w.t.Errorf("%v: got %v", r.f, map[bool]string{true: "allowed", false: "dropped"}[r.ok])
		}
	}
}

// agent is a running `sluice agent` inside the lab's node namespace.
type agent struct {
	t *testing.T
	*agentproc.Proc
}

// log is the agent's output so far, for failure messages.
func (a *agent) log() string { return a.Output() }

// startAgent starts the agent with args and waits until it reports that it runs (rules
// installed after the first snapshot).
func (w *world) startAgent(args ...string) *agent {
	w.t.Helper()
	a := w.spawnAgent(args...)
	a.waitLog("sluice agent running", 20*time.Second)
	return a
}

// spawnAgent starts the agent without waiting.
func (w *world) spawnAgent(args ...string) *agent {
	w.t.Helper()
	return w.spawnAgentEnv(nil, args...)
}

// spawnAgentEnv starts the agent with extra environment variables, without waiting.
func (w *world) spawnAgentEnv(env []string, args ...string) *agent {
	w.t.Helper()
	// Every agent judges the lab's pod interfaces as a node's CNI would have them, unless the
	// test says otherwise.
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--pod-interfaces") }) {
		args = append(args, "--pod-interfaces="+w.lab.PodInterfaces())
	}
	cmd := w.lab.NodeCommand(sluiceBin, append([]string{"agent"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	p, err := agentproc.Start(cmd)
	if err != nil {
		w.t.Fatal(err)
	}
	a := &agent{t: w.t, Proc: p}
	w.t.Cleanup(func() {
		a.stop()
		if w.t.Failed() {
			w.t.Logf("agent log (%s):\n%s", strings.Join(args, " "), a.log())
		}
	})
	return a
}

// stop ends the agent with SIGTERM (SIGCONT first, in case it was stopped), then SIGKILL.
func (a *agent) stop() { a.Stop(10 * time.Second) }

func (a *agent) exited() bool { return a.Exited() }

func (a *agent) signal(s syscall.Signal) {
	a.t.Helper()
	if err := a.Signal(s); err != nil {
		a.t.Fatalf("signal %v: %v", s, err)
	}
}

// waitState waits until every thread of the agent is in the given state ('T': stopped); a
// signal reaches the threads of a process one by one.
func (a *agent) waitState(state byte) {
	a.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", a.Pid()))
		all := len(tasks) > 0
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			i := bytes.LastIndexByte(b, ')')
			if err != nil || i < 0 || i+2 >= len(b) || b[i+2] != state {
				all = false
			}
		}
		if all {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	a.t.Fatalf("agent threads did not reach state %c", state)
}

// waitExit waits for the agent to exit and returns its exit code.
func (a *agent) waitExit(timeout time.Duration) int {
	a.t.Helper()
	code, err := a.Wait(timeout)
	if err != nil {
		a.t.Fatalf("agent %v; log:\n%s", err, a.log())
	}
	return code
}

// waitLog waits until the agent's log contains substr.
func (a *agent) waitLog(substr string, timeout time.Duration) {
	a.t.Helper()
	if err := a.WaitLog(substr, timeout); err != nil {
		a.t.Fatalf("%v; log:\n%s", err, a.log())
	}
}

var genRE = regexp.MustCompile(`policy snapshot in use"? generation=(\d+)`)

// generation is the newest snapshot generation the agent reported.
func (a *agent) generation() uint64 {
	m := genRE.FindAllStringSubmatch(a.log(), -1)
	if len(m) == 0 {
		return 0
	}
	g, _ := strconv.ParseUint(m[len(m)-1][1], 10, 64)
	return g
}

// reload rewrites the state file and waits until the agent uses the new snapshot.
func (w *world) reload(a *agent, policies ...string) {
	w.t.Helper()
	before := a.generation()
	w.writeState(policies...)
	deadline := time.Now().Add(15 * time.Second)
	for a.generation() <= before {
		if time.Now().After(deadline) {
			w.t.Fatalf("agent did not load the new state (generation still %d); log:\n%s", before, a.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// httpGet fetches path from the agent's metrics address inside the node namespace, with a
// deadline; err is set when nothing answers in time.
func (w *world) httpGet(path string, timeout time.Duration) (status int, body string, err error) {
	err = w.lab.Node().Do(func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:9963", timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path)
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return fmt.Errorf("bad status line %q", line)
		}
		status, _ = strconv.Atoi(f[1])
		rest, err := io.ReadAll(r)
		body = string(rest)
		if i := strings.Index(body, "\r\n\r\n"); i >= 0 {
			body = body[i+4:]
		}
		return err
	})
	return status, body, err
}

// metric returns the value of the sample whose line starts with prefix (name and labels).
func (w *world) metric(prefix string) float64 {
	w.t.Helper()
	_, body, err := w.httpGet("/metrics", 3*time.Second)
	if err != nil {
		w.t.Fatalf("metrics: %v", err)
	}
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, prefix) {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return v
		}
	}
	return 0
}

// sluiceRules counts the lines of iptables-save / ip6tables-save (both backends) and ipset
// names in the node namespace that belong to sluice.
func (w *world) sluiceRules() (rules int, sets int, dump string) {
	w.t.Helper()
	var b strings.Builder
	for _, cmd := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		out, _ := w.lab.NodeExec(cmd)
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "SLUICE") && strings.HasPrefix(l, "-A") {
				rules++
				b.WriteString(cmd + ": " + l + "\n")
			}
		}
	}
	out, _ := w.lab.NodeExec("ipset", "list", "-n")
	for _, n := range strings.Fields(out) {
		if strings.HasPrefix(n, "sluice") {
			sets++
			b.WriteString("ipset: " + n + "\n")
		}
	}
	return rules, sets, b.String()
}

// conn is a long-lived TCP connection from a pod, for tests about established flows.
type conn struct {
	t *testing.T
	c net.Conn
}

func (w *world) dial(from, to string, port uint16) *conn {
	w.t.Helper()
	_, dst := w.addrs(flow{from: from, to: to})
	var c net.Conn
	err := w.hosts[from].Do(func() (err error) {
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(dst, port).String(), probeTimeout)
		return err
	})
	if err != nil {
		w.t.Fatalf("dial %s -> %s:%d: %v", from, to, port, err)
	}
	w.t.Cleanup(func() { c.Close() })
	return &conn{t: w.t, c: c}
}

// echo sends a few bytes and reports whether they came back within timeout.
func (c *conn) echo(timeout time.Duration) bool {
	msg := []byte(strconv.FormatInt(time.Now().UnixNano(), 36))
	c.c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.c.Write(msg); err != nil {
		return false
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c.c, buf); err != nil {
		return false
	}
	return bytes.Equal(buf, msg)
}

var _ = context.Background
