// Command demo runs the seed's three-tier application for real: it builds a network-namespace
// lab (internal/netlab) with the application's pods and an outside host, starts `sluice agent`
// inside the lab's node namespace on the seed's policies, opens a real connection for every pair
// on the destination's service port, and prints what the seed says should happen beside what
// the packets did and what the agent logged. It exits non-zero when a flow disagrees.
//
//	go run ./internal/demo -sluice bin/sluice      (make demo)
package main

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
	"github.com/sluice-dev/sluice/policy"
)

//go:embed three-tier.yaml
var seedThreeTier []byte

// member is one host of the demo's application: a pod (ns != "") or the outside host, and the
// one service it offers, which every other member tries to reach.
type member struct {
	ns, name string
	labels   map[string]string
	v4, v6   netip.Addr
	proto    netlab.Proto
	port     uint16

	host *netlab.Host
}

func (e *member) isPod() bool { return e.ns != "" }

func (e *member) String() string {
	if e.isPod() {
		return e.ns + "/" + e.name
	}
	return e.name
}

// in reports whether e is a pod in namespace ns labelled key=value.
func (e *member) in(ns, key, value string) bool {
	return e.isPod() && e.ns == ns && e.labels[key] == value
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// The application: the seed's three tiers in "production", a monitoring pod, the cluster DNS,
// a pod in another namespace that carries the frontend's labels (a podSelector-only peer is
// confined to the policy's namespace, so it must not pass for the frontend), and a host outside
// the cluster.
func application() []*member {
	return []*member{
		{ns: "production", name: "frontend", labels: map[string]string{"app": "frontend", "tier": "frontend"},
			v4: addr("10.244.1.10"), v6: addr("fd00:10:244::a"), proto: netlab.TCP, port: 80},
		{ns: "production", name: "backend", labels: map[string]string{"app": "backend", "tier": "backend"},
			v4: addr("10.244.1.11"), v6: addr("fd00:10:244::b"), proto: netlab.TCP, port: 8080},
		{ns: "production", name: "database", labels: map[string]string{"app": "postgres", "tier": "database"},
			v4: addr("10.244.1.12"), v6: addr("fd00:10:244::c"), proto: netlab.TCP, port: 5432},
		{ns: "monitoring", name: "prometheus", labels: map[string]string{"app": "prometheus"},
			v4: addr("10.244.2.20"), v6: addr("fd00:10:244::14"), proto: netlab.TCP, port: 9090},
		{ns: "kube-system", name: "coredns", labels: map[string]string{"k8s-app": "kube-dns"},
			v4: addr("10.244.3.30"), v6: addr("fd00:10:244::1e"), proto: netlab.UDP, port: 53},
		{ns: "default", name: "decoy", labels: map[string]string{"app": "frontend", "tier": "frontend"},
			v4: addr("10.244.4.40"), v6: addr("fd00:10:244::28"), proto: netlab.TCP, port: 80},
		{name: "internet", v4: addr("203.0.113.50"), v6: addr("2001:db8:ffff::50"), proto: netlab.TCP, port: 443},
	}
}

var namespaceLabels = map[string]map[string]string{
	"production":  {"env": "production"},
	"monitoring":  {"purpose": "monitoring"},
	"kube-system": {},
	"default":     {},
}

// expect is the seed's "Complete Example" read by hand, independent of sluice's engine: a flow
// passes when the source's egress allows it (if a policy selects the source for egress) and the
// destination's ingress allows it (likewise). Ports without a protocol are TCP.
func expect(src, dst *member, proto netlab.Proto, port uint16) (bool, string) {
	tcp := func(p uint16) bool { return proto == netlab.TCP && port == p }
	switch {
	case src.in("production", "tier", "frontend"):
		// frontend-policy egress: backend pods on 8080, and UDP 53 to any pod in any namespace.
		if !(dst.in("production", "tier", "backend") && tcp(8080)) && !(dst.isPod() && proto == netlab.UDP && port == 53) {
			return false, "egress: frontend-policy allows only backend:8080 and DNS"
		}
	case src.in("production", "tier", "backend"):
		// backend-policy egress: database pods on 5432 only (no DNS).
		if !(dst.in("production", "tier", "database") && tcp(5432)) {
			return false, "egress: backend-policy allows only database:5432"
		}
	}
	switch {
	case dst.in("production", "tier", "frontend"):
		// frontend-policy ingress: from everywhere, port 80.
		if !tcp(80) {
			return false, "ingress: frontend-policy allows only port 80"
		}
	case dst.in("production", "tier", "backend"):
		if !(src.in("production", "tier", "frontend") && tcp(8080)) {
			return false, "ingress: backend-policy allows only the frontend on 8080"
		}
	case dst.in("production", "tier", "database"):
		if !(src.in("production", "tier", "backend") && tcp(5432)) {
			return false, "ingress: database-policy allows only the backend on 5432"
		}
	}
	return true, ""
}

type probe struct {
	src, dst *member
	to       netip.Addr
	expected bool
	why      string
	observed bool
	err      error
	log      *dropLine
}

func (p *probe) dstLabel() string {
	if p.to.Is6() {
		return p.dst.String() + " [v6]"
	}
	return p.dst.String()
}

// dropLine is the part of an agent drop log line (JSON) shown beside a flow.
type dropLine struct {
	Msg      string `json:"msg"`
	Src      string `json:"src"`
	Dst      string `json:"dst"`
	SrcIP    string `json:"src_ip"`
	DstIP    string `json:"dst_ip"`
	Proto    string `json:"proto"`
	Port     int    `json:"port"`
	Reason   string `json:"reason"`
	Policies string `json:"policies"`
	Why      string `json:"why"`
	raw      string
}

func main() {
	sluice := flag.String("sluice", "bin/sluice", "the sluice binary to run as the agent (make build)")
	policies := flag.String("policies", "deploy/examples/three-tier.yaml", "the three-tier policies; the seed's copy built into the demo is used when this file is missing")
	timeout := flag.Duration("timeout", 1500*time.Millisecond, "how long a probe waits before calling a flow dropped")
	queueNum := flag.Int("queue-num", 100, "NFQUEUE number for the agent (inside the lab's own namespace)")
	verbose := flag.Bool("v", false, "print the agent's whole log")
	flag.Parse()
	start := time.Now()
	code, err := run(*sluice, *policies, *timeout, *queueNum, *verbose)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		if code == 0 {
			code = 1
		}
	}
	fmt.Printf("\ndemo finished in %.1fs\n", time.Since(start).Seconds())
	os.Exit(code)
}

// lastLabID names the lab of the latest run, for the test to check that it is gone.
var lastLabID string

func run(sluice, policiesPath string, timeout time.Duration, queueNum int, verbose bool) (int, error) {
	if os.Geteuid() != 0 {
		return 1, errors.New("the demo builds network namespaces and kernel rules: run it as root")
	}
	bin, err := filepath.Abs(sluice)
	if err == nil {
		_, err = os.Stat(bin)
	}
	if err != nil {
		return 1, fmt.Errorf("sluice binary %q: %v (run make build first)", sluice, err)
	}
	pols, polSource := seedThreeTier, "the seed's three-tier example (built in)"
	if b, err := os.ReadFile(policiesPath); err == nil {
		pols, polSource = b, policiesPath
	}

	lab, err := netlab.New("sluice-demo", netlab.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		return 1, err
	}
	defer lab.Close()
	lastLabID = lab.ID
	// Ctrl-C or SIGTERM: remove the lab (and the agent in it) before going.
	lab.CloseOnSignal(nil)

	app := application()
	for _, e := range app {
		addHost := lab.AddOutside
		if e.isPod() {
			addHost = lab.AddHost
		}
		h, err := addHost(e.name, e.v4, e.v6)
		if err != nil {
			return 1, err
		}
		e.host = h
		if err := h.Serve(e.proto, e.port); err != nil {
			return 1, err
		}
	}

	dir, err := os.MkdirTemp("", "sluice-demo-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(dir)
	statePath := filepath.Join(dir, "state.yaml")
	if err := writeState(statePath, app, pols); err != nil {
		return 1, err
	}
	if _, _, err := policy.LoadFile(statePath); err != nil {
		return 1, fmt.Errorf("the generated state does not load: %w", err)
	}

	fmt.Printf("lab %s: node namespace %s, %d hosts; policies from %s\n", lab.ID, lab.Node().Netns, len(app), polSource)
	agent, err := startAgent(lab, bin, statePath, queueNum)
	if err != nil {
		return 1, err
	}
	defer agent.stop()
	readyIn, err := agent.waitReady(20 * time.Second)
	if err != nil {
		return 1, err
	}
	fmt.Printf("agent ready in %.1fs (backend: %s)\n\n", readyIn.Seconds(), agent.backend())

	probes := plan(app)
	runProbes(lab, probes, timeout)
	// Drop lines are written off the packet path; give the last ones a moment to arrive.
	time.Sleep(300 * time.Millisecond)
	agent.stop()
	rulesLeft := rulesRemaining(lab)
	matchLogs(probes, agent.lines())

	mismatches := report(os.Stdout, probes)
	if verbose {
		fmt.Println("\nagent log:")
		for _, l := range agent.lines() {
			fmt.Println("  " + l)
		}
	}
	if rulesLeft != "" {
		fmt.Printf("\nthe agent left rules behind after SIGTERM:\n%s\n", rulesLeft)
		mismatches++
	} else {
		fmt.Println("\nagent stopped with SIGTERM and removed its rules")
	}
	if mismatches > 0 {
		return 1, fmt.Errorf("%d flow(s) did not behave as the seed says", mismatches)
	}
	return 0, nil
}

// plan lists every ordered pair over IPv4 on the destination's service port, plus the
// production chain again over IPv6.
func plan(app []*member) []*probe {
	var ps []*probe
	add := func(src, dst *member, to netip.Addr) {
		ok, why := expect(src, dst, dst.proto, dst.port)
		ps = append(ps, &probe{src: src, dst: dst, to: to, expected: ok, why: why})
	}
	for _, src := range app {
		for _, dst := range app {
			if src != dst {
				add(src, dst, dst.v4)
			}
		}
	}
	byName := map[string]*member{}
	for _, e := range app {
		byName[e.name] = e
	}
	for _, pair := range [][2]string{
		{"internet", "frontend"}, {"frontend", "backend"}, {"backend", "database"},
		{"frontend", "database"}, {"internet", "backend"}, {"backend", "coredns"}, {"frontend", "coredns"},
	} {
		add(byName[pair[0]], byName[pair[1]], byName[pair[1]].v6)
	}
	return ps
}

func runProbes(lab *netlab.Lab, ps []*probe, timeout time.Duration) {
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			p.observed, p.err = lab.Probe(p.src.host, p.to, p.dst.proto, p.dst.port, timeout)
		}()
	}
	wg.Wait()
}

func matchLogs(ps []*probe, lines []string) {
	drops := map[string]*dropLine{}
	for _, l := range lines {
		var d dropLine
		if json.Unmarshal([]byte(l), &d) != nil || !strings.Contains(d.Msg, "dropped") {
			continue
		}
		d.raw = l
		key := d.SrcIP + " " + d.DstIP + " " + strings.ToUpper(d.Proto) + " " + fmt.Sprint(d.Port)
		if drops[key] == nil {
			drops[key] = &d
		}
	}
	for _, p := range ps {
		src, _ := p.src.host.Addr(p.to.Is6())
		key := src.String() + " " + p.to.String() + " " + p.dst.proto.String() + " " + fmt.Sprint(p.dst.port)
		p.log = drops[key]
	}
}

func verdict(ok bool) string {
	if ok {
		return "allowed"
	}
	return "dropped"
}

func report(w io.Writer, ps []*probe) int {
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].to.Is4() && ps[j].to.Is6() })
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tTO\tPORT\tEXPECTED\tOBSERVED\tCHECK\tAGENT LOG (drops)")
	mismatches, allowed := 0, 0
	for _, p := range ps {
		to := p.dstLabel()
		mark := "ok"
		if p.err != nil || p.observed != p.expected {
			mark = "MISMATCH"
			mismatches++
		}
		if p.observed {
			allowed++
		}
		obs := verdict(p.observed)
		if p.err != nil {
			obs = "error"
		}
		var logText string
		switch {
		case p.err != nil:
			logText = p.err.Error()
		case p.log != nil:
			// The why names the isolating policies already.
			logText = p.log.Reason
			if p.log.Why != "" {
				logText += ": " + p.log.Why
			} else if p.log.Policies != "" {
				logText += " by " + p.log.Policies
			}
		case !p.observed:
			logText = "(no drop line from the agent)"
		}
		exp := verdict(p.expected)
		fmt.Fprintf(tw, "%s\t%s\t%s/%d\t%s\t%s\t%s\t%s\n", p.src, to, p.dst.proto, p.dst.port, exp, obs, mark, logText)
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d flows: %d allowed, %d dropped, %d mismatches\n", len(ps), allowed, len(ps)-allowed, mismatches)
	for _, p := range ps {
		switch {
		case p.err != nil:
			fmt.Fprintf(w, "  %s -> %s: the probe failed: %v\n", p.src, p.dstLabel(), p.err)
		case p.observed && !p.expected:
			fmt.Fprintf(w, "  %s -> %s got through but the seed says drop (%s)\n", p.src, p.dstLabel(), p.why)
		case !p.observed && p.expected:
			fmt.Fprintf(w, "  %s -> %s was dropped but the seed allows it\n", p.src, p.dstLabel())
		}
	}
	return mismatches
}

func writeState(path string, app []*member, policies []byte) error {
	var buf bytes.Buffer
	buf.WriteString("# Generated by sluice's demo: the lab's pods with their lab addresses, then the policies.\n")
	names := make([]string, 0, len(namespaceLabels))
	for n := range namespaceLabels {
		names = append(names, n)
	}
	sort.Strings(names)
	doc := func(v any) error {
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		buf.WriteString("---\n")
		buf.Write(b)
		return nil
	}
	for _, n := range names {
		labels := map[string]string{"kubernetes.io/metadata.name": n}
		for k, v := range namespaceLabels[n] {
			labels[k] = v
		}
		if err := doc(&corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: n, Labels: labels},
		}); err != nil {
			return err
		}
	}
	for _, e := range app {
		if !e.isPod() {
			continue
		}
		proto := corev1.ProtocolTCP
		if e.proto == netlab.UDP {
			proto = corev1.ProtocolUDP
		}
		if err := doc(&corev1.Pod{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
			ObjectMeta: metav1.ObjectMeta{Name: e.name, Namespace: e.ns, Labels: e.labels},
			Spec: corev1.PodSpec{
				NodeName: "lab-node",
				Containers: []corev1.Container{{Name: e.name, Image: "demo",
					Ports: []corev1.ContainerPort{{ContainerPort: int32(e.port), Protocol: proto}}}},
			},
			Status: corev1.PodStatus{
				Phase:  corev1.PodRunning,
				PodIP:  e.v4.String(),
				PodIPs: []corev1.PodIP{{IP: e.v4.String()}, {IP: e.v6.String()}},
			},
		}); err != nil {
			return err
		}
	}
	buf.WriteString("---\n")
	buf.Write(policies)
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// agentProc is `sluice agent` running in the lab's node namespace.
type agentProc struct {
	*agentproc.Proc
	lab *netlab.Lab
}

func startAgent(lab *netlab.Lab, bin, state string, queueNum int) (*agentProc, error) {
	p, err := agentproc.Start(lab.NodeCommand(bin, "agent", "--state", state, "--queue-num", fmt.Sprint(queueNum),
		"--metrics-addr", agentproc.DefaultMetricsAddr, "--log-format", "json",
		"--pod-interfaces", lab.PodInterfaces()))
	if err != nil {
		return nil, err
	}
	return &agentProc{Proc: p, lab: lab}, nil
}

func (a *agentProc) lines() []string { return a.Lines() }

// backend picks the iptables flavour out of the agent's "kernel rules installed" line.
func (a *agentProc) backend() string {
	for _, l := range a.lines() {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil {
			if b, ok := m["backend"].(string); ok {
				return b
			}
		}
	}
	return "not logged"
}

// waitReady polls the agent's /readyz from inside the node namespace (where its metrics
// listener lives) until it answers 200, the agent dies, or the wait runs out.
func (a *agentProc) waitReady(wait time.Duration) (time.Duration, error) {
	d, err := a.WaitReady(a.lab.Node().Do, agentproc.DefaultMetricsAddr, wait)
	if err != nil {
		return 0, fmt.Errorf("%w; its log:\n  %s", err, strings.Join(a.lines(), "\n  "))
	}
	return d, nil
}

// stop sends SIGTERM and waits for the agent to remove its rules and exit (SIGKILL after 10 s).
func (a *agentProc) stop() { a.Stop(10 * time.Second) }

// rulesRemaining returns the sluice rules still in the node namespace ("" when none).
func rulesRemaining(lab *netlab.Lab) string {
	var left []string
	for _, save := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		out, err := lab.NodeExec(save, "-t", "filter")
		if err != nil {
			continue
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "SLUICE") {
				left = append(left, save+": "+l)
			}
		}
	}
	return strings.Join(left, "\n")
}
