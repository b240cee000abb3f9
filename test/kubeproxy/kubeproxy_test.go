// Package kubeproxy runs a real kube-proxy (built from k8s.io/kubernetes by hack/kube-assets.sh)
// in front of sluice, in a lab node namespace, against a real kube-apiserver: pods reach each
// other through ClusterIPs with real packets, in kube-proxy's iptables and nftables modes, with
// kube-proxy started before and after the agent. The Services, EndpointSlices and the Node are
// written by the test (no controller-manager), so which backend a ClusterIP leads to is known.
package kubeproxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/kubenode"
	"github.com/sluice-dev/sluice/internal/netlab"
	"github.com/sluice-dev/sluice/watch/kubetest"
)

const (
	nodeName    = "node-1"
	ns          = "shop"
	clusterCIDR = "10.244.0.0/16"
	agentQueue  = "190"
)

var nodeIP = netip.MustParseAddr("10.240.0.1")

type labPod struct {
	name   string
	labels map[string]string // nil: not a pod (a host outside the cluster)
	ip     netip.Addr
	port   uint16 // served on TCP, 0: none
}

var labPods = []labPod{
	{name: "frontend", labels: map[string]string{"app": "frontend"}, ip: netip.MustParseAddr("10.244.1.10")},
	{name: "backend", labels: map[string]string{"app": "backend"}, ip: netip.MustParseAddr("10.244.1.11"), port: 8080},
	{name: "other", labels: map[string]string{"app": "other"}, ip: netip.MustParseAddr("10.244.1.12")},
	{name: "db", labels: map[string]string{"app": "db"}, ip: netip.MustParseAddr("10.244.1.13"), port: 5432},
	{name: "internet", ip: netip.MustParseAddr("203.0.113.50")},
}

// Services: backend:80 -> backend pod :8080, db:5432 -> db pod :5432, and "empty", whose
// selector matches no pod and which has no EndpointSlice: kube-proxy rejects connections to it.
type labService struct {
	name       string
	port       int32
	target     string // pod name, "" for none
	targetPort int32
}

var labServices = []labService{
	{name: "backend", port: 80, target: "backend", targetPort: 8080},
	{name: "db", port: 5432, target: "db", targetPort: 5432},
	{name: "empty", port: 80},
}

// flow is one connection through a ClusterIP and its verdict under the test's policies:
// backend takes ingress on 8080 from app=frontend and app=backend only, db takes no ingress.
// marked flows carry kube-proxy's masquerade mark through FORWARD (a hairpin, or a client from
// outside the cluster CIDR); in iptables mode KUBE-FORWARD accepts those.
type flow struct {
	from, svc string
	allowed   bool
	marked    bool
}

var (
	frontendToBackend = flow{"frontend", "backend", true, false}
	otherToBackend    = flow{"other", "backend", false, false}
	frontendToDB      = flow{"frontend", "db", false, false}
	backendHairpin    = flow{"backend", "backend", true, true} // a pod reaching itself through its Service, allowed by its own labels
	dbHairpin         = flow{"db", "db", false, true}          // the same for a pod whose ingress is denied to all
	internetToBackend = flow{"internet", "backend", false, true}
)

func (f flow) String() string { return f.from + " -> svc/" + f.svc }

// cluster is the API side, shared by the scenarios of one test.
type cluster struct {
	env      *kubetest.Env
	c        kubernetes.Interface
	bin      string // sluice
	proxyBin string // kube-proxy
	svcIP    map[string]netip.Addr
}

func repoRoot(t *testing.T) string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

func newCluster(t *testing.T) *cluster {
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and kernel rules: run it as root (make test does)")
	}
	for _, tool := range []string{"nsenter", "iptables", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: run hack/deps.sh and hack/node-deps.sh (make test does)", tool)
		}
	}
	assets, err := kubetest.Assets()
	if err != nil {
		t.Fatal(err)
	}
	cl := &cluster{proxyBin: filepath.Join(assets, "kube-proxy"), svcIP: map[string]netip.Addr{}}
	if _, err := os.Stat(cl.proxyBin); err != nil {
		t.Fatalf("kube-proxy is not in %s: run `bash hack/kube-assets.sh` (it builds kube-proxy with kube-apiserver and etcd): %v", assets, err)
	}
	cl.bin = filepath.Join(t.TempDir(), "sluice")
	build := exec.Command("go", "build", "-o", cl.bin, "./cmd/sluice")
	build.Dir = repoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/sluice: %v\n%s", err, out)
	}
	cl.env = kubetest.Start(t)
	cl.c = cl.env.Client
	cl.createObjects(t)
	return cl
}

func (cl *cluster) createObjects(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := cl.c
	node, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP.String()}, {Type: corev1.NodeHostName, Address: nodeName}}
	if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range labPods {
		if p.labels == nil {
			continue
		}
		spec := corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1"}}}
		if p.port != 0 {
			spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: int32(p.port)}}
		}
		created, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: ns, Labels: p.labels}, Spec: spec}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip.String(), PodIPs: []corev1.PodIP{{IP: p.ip.String()}}}
		if _, err := c.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range labServices {
		sel := map[string]string{"app": "nothing"}
		if s.target != "" {
			sel = podByName(s.target).labels
		}
		svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: ns},
			Spec: corev1.ServiceSpec{Selector: sel, Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: s.port,
				TargetPort: intstr.FromInt32(max(s.targetPort, s.port))}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cl.svcIP[s.name] = netip.MustParseAddr(svc.Spec.ClusterIP)
		if s.target == "" {
			continue
		}
		p := podByName(s.target)
		if _, err := c.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: s.name + "-1", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: s.name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{p.ip.String()}, NodeName: new(nodeName),
				Conditions: discoveryv1.EndpointConditions{Ready: new(true), Serving: new(true), Terminating: new(false)}}},
			Ports: []discoveryv1.EndpointPort{{Name: new(""), Protocol: new(corev1.ProtocolTCP), Port: new(s.targetPort)}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	tcp := corev1.ProtocolTCP
	port8080 := intstr.FromInt32(8080)
	policies := []networkingv1.NetworkPolicy{
		{
			ObjectMeta: metav1.ObjectMeta{Name: "backend-ingress", Namespace: ns},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}}},
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}}},
					},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port8080}},
				}},
			},
		},
		{
			ObjectMeta: metav1.ObjectMeta{Name: "db-deny-ingress", Namespace: ns},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			},
		},
	}
	for i := range policies {
		if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, &policies[i], metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("API objects: node %s (InternalIP %v), %d pods, services %v, 2 policies", nodeName, nodeIP, len(labPods)-1, cl.svcIP)
}

func podByName(name string) labPod {
	for _, p := range labPods {
		if p.name == name {
			return p
		}
	}
	panic("no lab pod " + name)
}

// node is one lab node: its namespace, the pods, and the components running there.
type node struct {
	t     *testing.T
	cl    *cluster
	lab   *netlab.Lab
	hosts map[string]*netlab.Host
	dir   string
	mode  string
	proxy *agentproc.Proc
	agent *agentproc.Proc
}

func (cl *cluster) newNode(t *testing.T, mode string) *node {
	n := &node{t: t, cl: cl, lab: netlab.NewT(t), hosts: map[string]*netlab.Host{}, dir: t.TempDir(), mode: mode}
	if err := n.lab.AddNodeAddr(nodeIP); err != nil {
		t.Fatal(err)
	}
	// A real node has a default route; without one, a packet to a ClusterIP that nothing
	// translated would be refused by routing (ICMP net unreachable) before any filter rule, and a
	// client could not hang. This kernel has no dummy device, so the route leads into a veth whose
	// peer stays down and which never resolves neighbours: whatever takes it is discarded in
	// silence, as a real uplink would lose it, and nothing leaves the lab.
	for _, args := range [][]string{
		{"link", "add", "void0", "type", "veth", "peer", "name", "void1"},
		{"link", "set", "void0", "arp", "off", "up"},
		{"route", "add", "default", "dev", "void0"},
	} {
		if _, err := n.lab.NodeExec("ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range labPods {
		h, err := n.lab.AddHost(p.name, p.ip)
		if err != nil {
			t.Fatal(err)
		}
		n.hosts[p.name] = h
		if p.port != 0 {
			if err := h.Serve(netlab.TCP, p.port); err != nil {
				t.Fatal(err)
			}
		}
	}
	u, err := url.Parse(cl.env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	fw, err := kubenode.Forward(n.lab.Node(), u.Host)
	if err != nil {
		t.Fatalf("forwarding the API server into the node namespace: %v", err)
	}
	t.Cleanup(func() { fw.Close() })
	return n
}

func (n *node) startProxy() {
	t := n.t
	kp := kubenode.KubeProxy{Binary: n.cl.proxyBin, Kubeconfig: n.cl.env.Kubeconfig, NodeName: nodeName, Mode: n.mode, ClusterCIDR: clusterCIDR, Dir: n.dir}
	p, err := kp.Start(n.lab.Node())
	if err != nil {
		t.Fatal(err)
	}
	n.proxy = p
	stopAtEnd(t, "kube-proxy", p)
	start := time.Now()
	if err := kubenode.WaitHealthy(n.lab.Node(), p, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	// Healthy means synced once; the Services are in when the allowed flow goes through.
	n.eventually("kube-proxy programs the ClusterIPs", 30*time.Second, []flow{frontendToBackend})
	t.Logf("kube-proxy (%s mode) serving the ClusterIPs after %v", n.mode, time.Since(start).Round(time.Millisecond))
}

// stopAtEnd stops a node component when the test ends (it must not have died meanwhile) and
// shows its log when the test failed.
func stopAtEnd(t *testing.T, name string, p *agentproc.Proc) {
	t.Cleanup(func() {
		if p.Exited() {
			t.Errorf("%s exited during the test (%v)", name, p.Err())
		}
		p.Stop(15 * time.Second)
		if t.Failed() {
			t.Logf("%s log:\n%s", name, p.Tail(4000))
		}
	})
}

func (n *node) startAgent() {
	t := n.t
	p, err := kubenode.Start(n.lab.Node(), n.cl.bin, "agent", "--kubeconfig", n.cl.env.Kubeconfig, "--node", nodeName,
		"--queue-num", agentQueue, "--metrics-addr", agentproc.DefaultMetricsAddr, "--log-format", "text")
	if err != nil {
		t.Fatal(err)
	}
	n.agent = p
	stopAtEnd(t, "the agent", p)
	d, err := p.WaitReady(n.lab.Node().Do, agentproc.DefaultMetricsAddr, 60*time.Second)
	if err != nil {
		t.Fatalf("%v:\n%s", err, p.Tail(4000))
	}
	t.Logf("agent ready after %v", d.Round(time.Millisecond))
}

// probe opens one TCP connection through the flow's ClusterIP; refused reports a fast
// rejection (RST or ICMP port unreachable) apart from a timeout.
func (n *node) probe(f flow, timeout time.Duration) (ok, refused bool) {
	ok, err := n.lab.Probe(n.hosts[f.from], n.cl.svcIP[f.svc], netlab.TCP, uint16(svcPort(f.svc)), timeout)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return false, true
		}
		n.t.Fatalf("probe %v: %v", f, err)
	}
	return ok, false
}

func svcPort(name string) int32 {
	for _, s := range labServices {
		if s.name == name {
			return s.port
		}
	}
	panic("no lab service " + name)
}

// eventually probes the flows until each gives its verdict (every flow allowed when the agent
// is not running), within wait: sluice repairs its rules on a resync, so a verdict may take that
// long to settle; then it checks once more that it holds.
func (n *node) eventually(what string, wait time.Duration, flows []flow) {
	t := n.t
	t.Helper()
	want := func(f flow) bool { return f.allowed || n.agent == nil }
	deadline := time.Now().Add(wait)
	for {
		var wrong []string
		for _, f := range flows {
			if got, _ := n.probe(f, 700*time.Millisecond); got != want(f) {
				wrong = append(wrong, fmt.Sprintf("%v: allowed=%v, want %v", f, got, want(f)))
			}
		}
		if len(wrong) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: after %v still wrong: %s\n%s", what, wait, strings.Join(wrong, "; "), n.rules())
		}
		time.Sleep(300 * time.Millisecond)
	}
	for _, f := range flows {
		if got, _ := n.probe(f, 700*time.Millisecond); got != want(f) {
			t.Fatalf("%s: %v flipped back to allowed=%v\n%s", what, f, got, n.rules())
		}
	}
}

// rejected checks that a connection to a Service without endpoints is refused at once (kube-
// proxy's REJECT), not left to hang.
func (n *node) rejected(from string) {
	t := n.t
	t.Helper()
	f := flow{from: from, svc: "empty"}
	start := time.Now()
	ok, refused := n.probe(f, 3*time.Second)
	switch {
	case ok:
		t.Fatalf("%v connected, but the service has no endpoints", f)
	case !refused:
		t.Fatalf("%v hung for %v instead of being refused (kube-proxy's REJECT for a service without endpoints did not apply)\n%s", f, time.Since(start).Round(time.Millisecond), n.rules())
	}
	t.Logf("%v refused after %v", f, time.Since(start).Round(time.Millisecond))
}

// rules is the node's FORWARD chain and kube-proxy's table, for failure messages.
func (n *node) rules() string {
	var b strings.Builder
	out, _ := n.lab.NodeExec("iptables", "-S", "FORWARD")
	fmt.Fprintf(&b, "node FORWARD chain (iptables-nft):\n%s", out)
	if n.mode == "nftables" {
		out, _ = n.lab.NodeExec("nft", "list", "chain", "ip", "kube-proxy", "filter-forward")
		fmt.Fprintf(&b, "kube-proxy filter-forward:\n%s", out)
	}
	return b.String()
}

// droppedPostDNAT checks the agent's drop log judged the flow on the backend pod and its
// target port, not on the ClusterIP and the Service's port.
func (n *node) droppedPostDNAT(f flow) {
	t := n.t
	t.Helper()
	backend := podByName(f.svc)
	var target int32
	for _, s := range labServices {
		if s.name == f.svc {
			target = s.targetPort
		}
	}
	want := []string{"src=" + ns + "/" + f.from, "dst=" + ns + "/" + backend.name, fmt.Sprintf("port=%d", target)}
	if podByName(f.from).labels == nil {
		want[0] = "src=" + podByName(f.from).ip.String()
	}
	for _, line := range strings.Split(n.agent.Tail(1<<20), "\n") {
		if !strings.Contains(line, "packet dropped") {
			continue
		}
		all := true
		for _, w := range want {
			all = all && strings.Contains(line, w)
		}
		if all {
			return
		}
	}
	t.Errorf("no drop line with %q for %v in the agent log:\n%s", want, f, n.agent.Tail(3000))
}

type scenario struct {
	mode        string // kube-proxy's
	proxyFirst  bool   // kube-proxy started before the agent
	flows       []flow
	noEndpoints bool // check the REJECT for a Service without endpoints
}

func (s scenario) name() string {
	if s.proxyFirst {
		return s.mode + "/kube-proxy-then-sluice"
	}
	return s.mode + "/sluice-then-kube-proxy"
}

func runScenarios(t *testing.T, scenarios []scenario) {
	cl := newCluster(t)
	for _, s := range scenarios {
		t.Run(s.name(), func(t *testing.T) {
			n := cl.newNode(t, s.mode)
			if s.proxyFirst {
				n.startProxy()
				// Control: kube-proxy alone lets every flow through (so the drops below are
				// sluice's) and rejects the Service without endpoints (so the lab can show a hang).
				n.eventually("control: kube-proxy without sluice", 10*time.Second, s.flows)
				if s.noEndpoints {
					n.rejected("frontend")
				}
				n.startAgent()
			} else {
				n.startAgent()
				n.startProxy()
			}
			n.eventually("sluice enforcing behind kube-proxy", 30*time.Second, s.flows)
			for _, f := range s.flows {
				if !f.allowed && !f.marked {
					n.droppedPostDNAT(f)
				}
			}
			if s.noEndpoints {
				n.rejected("frontend")
			}
		})
	}
}

var (
	unmarkedFlows = []flow{frontendToBackend, otherToBackend, frontendToDB}
	allFlows      = []flow{frontendToBackend, otherToBackend, frontendToDB, backendHairpin, dbHairpin, internetToBackend}
)

// TestClusterIPJudgedOnBackend: through kube-proxy, a connection to a ClusterIP is judged on the
// pod it is translated to (post-DNAT, the target port), allowed and denied, including a pod
// reaching itself through its Service (judged as the pod to itself) and a client from outside
// the cluster; and a Service without endpoints refuses at once. Where this needs the agent's
// fixes for the node-integrity issue (kube-proxy's jumps and sluice's accept), see
// issue13_test.go.
func TestClusterIPJudgedOnBackend(t *testing.T) {
	runScenarios(t, []scenario{
		{mode: "iptables", proxyFirst: true, flows: allFlows},
		{mode: "iptables", proxyFirst: false, flows: unmarkedFlows, noEndpoints: true},
		{mode: "nftables", proxyFirst: true, flows: allFlows, noEndpoints: true},
		{mode: "nftables", proxyFirst: false, flows: allFlows, noEndpoints: true},
	})
}
