// Package netlab builds a routed, Calico-style network lab on this machine, entirely inside
// network namespaces it creates: a "node" namespace that routes (ip_forward on, v4 and v6) and one
// namespace per pod or outside host, each joined to the node by a veth pair. Tests, the demo and
// the benchmark run sluice's agent inside the node namespace, where its iptables rules, NFQUEUE
// queues and conntrack table are private to the lab.
//
// Addressing follows Calico: a pod's address is a /32 (/128) on its eth0 and its only route is
// `default via 169.254.1.1 dev eth0 onlink` (IPv6: via fe80::1); the node holds a /32 (/128) host
// route per pod towards its veth and owns the gateway addresses on every node-side veth, because a
// node namespace has no default route and proxy ARP alone would not answer for the gateway.
//
// Nothing is created in the machine's own namespace: every veth is created inside the node
// namespace with its peer moved straight into the pod namespace, and the node namespace has no
// route out, so no lab packet can leave the lab.
package netlab

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Gateway addresses the node side of every veth owns; pods route everything through them.
var (
	Gateway4 = netip.MustParseAddr("169.254.1.1")
	Gateway6 = netip.MustParseAddr("fe80::1")
)

// Prefix starts every namespace and interface name a lab creates, followed by 6 hex digits that
// identify one lab. The stale-lab sweeper only ever looks at names of this shape.
const Prefix = "sl"

// markerDir holds one file per live lab (its owner's pid and process start time), written before
// any namespace exists, so that a namespace with our prefix and no live marker is a leftover.
const markerDir = "/run/sluice-netlab"

var nsNameRE = regexp.MustCompile(`^` + Prefix + `([0-9a-f]{6})-`)

// TB is the part of testing.TB the lab uses; *testing.T and *testing.B satisfy it. It is an
// interface so that non-test programs (the demo, the benchmark) don't link the testing package.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Cleanup(func())
	Name() string
}

// Option configures a lab.
type Option func(*Lab)

// WithLogger sends the lab's own log lines (namespace creation, cleanup) to log.
func WithLogger(log *slog.Logger) Option { return func(l *Lab) { l.log = log } }

// Lab is one network-namespace lab. Its methods are safe for concurrent use.
type Lab struct {
	ID   string // Prefix + 6 hex digits, unique per lab
	Name string // caller's label, for logs only

	log  *slog.Logger
	node *Host

	mu      sync.Mutex
	hosts   []*Host
	byName  map[string]*Host
	byAddr  map[netip.Addr]*Host
	closers []io.Closer
	closed  bool
	nextIdx int

	sctp     sctpRegistry
	udpPorts map[udpKey]bool // UDP has no refusal an unconnected probe could see; see Probe
}

type udpKey struct {
	h    *Host
	port uint16
}

// New builds an empty lab: the node namespace with forwarding on and no route anywhere.
// Callers must Close it; New removes what it made if it fails half-way.
func New(name string, opts ...Option) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("netlab: network namespaces need root; run the tests as root (sudo -E go test ...)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, errors.New("netlab: the ip command (iproute2) is missing; run hack/deps.sh")
	}
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("netlab: random lab id: %w", err)
	}
	l := &Lab{
		ID:     Prefix + hex.EncodeToString(b[:]),
		Name:   name,
		log:    slog.New(slog.DiscardHandler),
		byName: map[string]*Host{},
		byAddr: map[netip.Addr]*Host{},

		udpPorts: map[udpKey]bool{},
	}
	for _, o := range opts {
		o(l)
	}
	l.sctp.init()
	Sweep(l.log)
	if err := l.writeMarker(); err != nil {
		return nil, err
	}
	node := &Host{lab: l, Name: "node", Netns: l.ID + "-node"}
	if err := l.createNetns(node.Netns); err != nil {
		l.removeMarker()
		return nil, err
	}
	l.node = node
	// The node routes for everyone (forwarding) and must not hold back lab addresses behind DAD.
	err := node.writeSysctls(map[string]string{
		"net/ipv4/ip_forward":              "1",
		"net/ipv6/conf/all/forwarding":     "1",
		"net/ipv6/conf/default/forwarding": "1",
		"net/ipv6/conf/all/accept_dad":     "0",
		"net/ipv6/conf/default/accept_dad": "0",
		"net/ipv4/conf/all/rp_filter":      "0",
		"net/ipv4/conf/default/rp_filter":  "0",
	})
	if err == nil {
		_, err = node.Exec("ip", "link", "set", "lo", "up")
	}
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("netlab: set up node namespace: %w", err)
	}
	l.log.Info("netlab: lab created", "lab", l.ID, "name", name, "node_netns", node.Netns)
	return l, nil
}

// NewT builds a lab for a test and removes it when the test ends. It fails the test (it never
// skips) when the lab cannot be built, e.g. when not running as root.
func NewT(t TB, opts ...Option) *Lab {
	t.Helper()
	l, err := New(t.Name(), opts...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// Node is the router namespace, where the agent and its rules live.
func (l *Lab) Node() *Host { return l.node }

// NodeCommand prepares name args... to run inside the node namespace.
func (l *Lab) NodeCommand(name string, args ...string) *exec.Cmd {
	return l.node.Command(name, args...)
}

// NodeExec runs name args... inside the node namespace and returns its combined output.
func (l *Lab) NodeExec(name string, args ...string) (string, error) {
	return l.node.Exec(name, args...)
}

// Host returns the host added under name, or nil.
func (l *Lab) Host(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byName[name]
}

// HostByAddr returns the host (or the node) that owns addr, or nil.
func (l *Lab) HostByAddr(addr netip.Addr) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byAddr[addr.Unmap()]
}

// Hosts returns every host in the order they were added (the node not included).
func (l *Lab) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Host(nil), l.hosts...)
}

// AddNodeAddr gives the node namespace extra addresses (on its loopback), the lab's stand-in for
// a node's InternalIP: pods reach them through their default route and the node's INPUT chain.
func (l *Lab) AddNodeAddr(addrs ...netip.Addr) error {
	var script strings.Builder
	for _, a := range addrs {
		a = a.Unmap()
		fmt.Fprintf(&script, "addr add %s dev lo\n", netip.PrefixFrom(a, a.BitLen()))
	}
	if err := l.node.ipBatch(script.String()); err != nil {
		return fmt.Errorf("netlab: add node addresses: %w", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, a := range addrs {
		l.byAddr[a.Unmap()] = l.node
		l.node.Addrs = append(l.node.Addrs, a.Unmap())
	}
	return nil
}

var hostNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{0,40}$`)

// AddHost adds a pod: its own namespace, a veth to the node (eth0 inside it), every address in
// ips as /32 or /128, default routes via the node's gateway addresses, and the node's host
// routes back. name must be unique in the lab (lower-case letters, digits, '-', '.'). The node
// side of a pod's veth is named after PodInterfaces, as a CNI names its pod interfaces.
func (l *Lab) AddHost(name string, ips ...netip.Addr) (*Host, error) {
	return l.addHost(name, "h", ips)
}

// AddOutside adds a host that is not a pod (an ipBlock peer, "the internet"), wired like a pod
// but on a veth whose name does not match PodInterfaces, as a node's uplink would not.
func (l *Lab) AddOutside(name string, ips ...netip.Addr) (*Host, error) {
	return l.addHost(name, "o", ips)
}

// PodInterfaces is the iptables interface pattern that matches the node side of every pod's
// veth in this lab and nothing else (for sluice agent --pod-interfaces).
func (l *Lab) PodInterfaces() string { return l.ID + "h+" }

func (l *Lab) addHost(name, kind string, ips []netip.Addr) (*Host, error) {
	if !hostNameRE.MatchString(name) || name == "node" {
		return nil, fmt.Errorf("netlab: host name %q: use lower-case letters, digits, '-' and '.', and not \"node\"", name)
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("netlab: host %s: give it at least one address", name)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("netlab: lab is closed")
	}
	if l.byName[name] != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("netlab: host %s exists already", name)
	}
	var v4, v6 bool
	for i, a := range ips {
		a = a.Unmap()
		ips[i] = a
		if !a.IsValid() || a.IsLinkLocalUnicast() || a.IsLoopback() || a.IsMulticast() || a.IsUnspecified() {
			l.mu.Unlock()
			return nil, fmt.Errorf("netlab: host %s: %v is not a usable unicast address", name, a)
		}
		if owner := l.byAddr[a]; owner != nil {
			l.mu.Unlock()
			return nil, fmt.Errorf("netlab: host %s: %v belongs to %s already", name, a, owner.Name)
		}
		if a.Is4() {
			v4 = true
		} else {
			v6 = true
		}
	}
	l.nextIdx++
	h := &Host{
		lab:   l,
		Name:  name,
		Netns: l.ID + "-" + name,
		Veth:  l.ID + kind + strconv.Itoa(l.nextIdx),
		Addrs: append([]netip.Addr(nil), ips...),
	}
	// Reserve the name and addresses now so concurrent AddHost calls can't collide; undone on error.
	l.byName[name] = h
	for _, a := range h.Addrs {
		l.byAddr[a] = h
	}
	l.mu.Unlock()

	if err := l.setupHost(h, v4, v6); err != nil {
		l.mu.Lock()
		delete(l.byName, name)
		for _, a := range h.Addrs {
			delete(l.byAddr, a)
		}
		l.mu.Unlock()
		l.deleteNetns(h.Netns)
		return nil, err
	}
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	l.log.Debug("netlab: host added", "lab", l.ID, "host", name, "addrs", h.Addrs, "veth", h.Veth)
	return h, nil
}

func (l *Lab) setupHost(h *Host, v4, v6 bool) error {
	if len(h.Veth) > 15 {
		return fmt.Errorf("netlab: interface name %s is longer than 15 characters; too many hosts in one lab", h.Veth)
	}
	if err := l.createNetns(h.Netns); err != nil {
		return err
	}
	// Before the veth arrives: its IPv6 config is created from this namespace's defaults, and DAD
	// would keep the pod's addresses tentative (unusable) for a second or more.
	if err := h.writeSysctls(map[string]string{
		"net/ipv6/conf/all/accept_dad":       "0",
		"net/ipv6/conf/default/accept_dad":   "0",
		"net/ipv6/conf/all/disable_ipv6":     "0",
		"net/ipv6/conf/default/disable_ipv6": "0",
	}); err != nil {
		return fmt.Errorf("netlab: host %s: %w", h.Name, err)
	}

	var node strings.Builder
	fmt.Fprintf(&node, "link add %s type veth peer name eth0 netns %s\n", h.Veth, h.Netns)
	fmt.Fprintf(&node, "link set %s up\n", h.Veth)
	fmt.Fprintf(&node, "addr add %s/32 dev %s\n", Gateway4, h.Veth)
	fmt.Fprintf(&node, "addr add %s/64 dev %s nodad\n", Gateway6, h.Veth)
	for _, a := range h.Addrs {
		if a.Is4() {
			fmt.Fprintf(&node, "route add %s/32 dev %s\n", a, h.Veth)
		} else {
			fmt.Fprintf(&node, "route add %s/128 dev %s\n", a, h.Veth)
		}
	}
	if err := l.node.ipBatch(node.String()); err != nil {
		return fmt.Errorf("netlab: host %s, node side: %w", h.Name, err)
	}

	var pod strings.Builder
	pod.WriteString("link set lo up\n")
	for _, a := range h.Addrs {
		if a.Is4() {
			fmt.Fprintf(&pod, "addr add %s/32 dev eth0\n", a)
		} else {
			fmt.Fprintf(&pod, "addr add %s/128 dev eth0 nodad\n", a)
		}
	}
	pod.WriteString("link set eth0 up\n")
	if v4 {
		fmt.Fprintf(&pod, "route add default via %s dev eth0 onlink\n", Gateway4)
	}
	if v6 {
		fmt.Fprintf(&pod, "route add default via %s dev eth0\n", Gateway6)
	}
	if err := h.ipBatch(pod.String()); err != nil {
		return fmt.Errorf("netlab: host %s, pod side: %w", h.Name, err)
	}
	return nil
}

// Close removes everything the lab made: listeners, processes left in its namespaces, the
// namespaces (and with them every veth, route, rule and queue in them) and the marker. It is
// idempotent and safe to call from a signal handler's goroutine.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	closers := l.closers
	l.closers = nil
	hosts := append([]*Host(nil), l.hosts...)
	l.mu.Unlock()

	for _, c := range closers {
		c.Close()
	}
	var errs []error
	for _, h := range hosts {
		errs = append(errs, l.deleteNetns(h.Netns))
	}
	if l.node != nil {
		errs = append(errs, l.deleteNetns(l.node.Netns))
	}
	l.removeMarker()
	l.log.Info("netlab: lab removed", "lab", l.ID)
	return errors.Join(errs...)
}

// CloseOnSignal removes the lab when the process gets SIGINT or SIGTERM, then calls then (nil:
// exit with status 130). Programs (the demo, the benchmark) call it right after New; tests rely
// on t.Cleanup instead.
func (l *Lab) CloseOnSignal(then func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-c
		fmt.Fprintf(os.Stderr, "%v: removing network lab %s\n", s, l.ID)
		l.Close()
		if then != nil {
			then()
			return
		}
		os.Exit(130)
	}()
}

func (l *Lab) addCloser(c io.Closer) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return errors.New("netlab: lab is closed")
	}
	l.closers = append(l.closers, c)
	return nil
}

func (l *Lab) createNetns(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("netlab: ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	return nil
}

// deleteNetns kills what still runs in the namespace (processes the lab's users started there,
// such as an agent) so the namespace really goes away, then removes its name.
func (l *Lab) deleteNetns(name string) error {
	killNetnsPids(name)
	out, err := exec.Command("ip", "netns", "del", name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("netlab: ip netns del %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	return nil
}

func killNetnsPids(name string) {
	out, err := exec.Command("ip", "netns", "pids", name).Output()
	if err != nil {
		return
	}
	self := os.Getpid()
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		if p, err := os.FindProcess(pid); err == nil {
			p.Kill()
		}
	}
}

func (l *Lab) markerPath() string { return filepath.Join(markerDir, l.ID) }

func (l *Lab) writeMarker() error {
	if err := os.MkdirAll(markerDir, 0o755); err != nil {
		return fmt.Errorf("netlab: %w", err)
	}
	st, err := procStart(os.Getpid())
	if err != nil {
		return fmt.Errorf("netlab: read own start time: %w", err)
	}
	data := fmt.Sprintf("%d %s %s\n", os.Getpid(), st, strings.ReplaceAll(l.Name, "\n", " "))
	if err := os.WriteFile(l.markerPath(), []byte(data), 0o644); err != nil {
		return fmt.Errorf("netlab: %w", err)
	}
	return nil
}

func (l *Lab) removeMarker() { os.Remove(l.markerPath()) }

// procStart returns field 22 of /proc/PID/stat (start time in clock ticks since boot); with the
// pid it names a process uniquely even when pids are reused.
func procStart(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command name may contain spaces and parentheses
	if i < 0 {
		return "", errors.New("unexpected /proc stat format")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return "", errors.New("unexpected /proc stat format")
	}
	return f[19], nil
}

// markerAlive reports whether the lab id's owner process still runs.
func markerAlive(id string) bool {
	b, err := os.ReadFile(filepath.Join(markerDir, id))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return false
	}
	st, err := procStart(pid)
	return err == nil && st == f[1]
}

// Sweep removes namespaces left by labs whose process is gone (a killed test, a crashed demo).
// A lab writes its marker before its first namespace, so a namespace without a live marker is
// a leftover. New calls it; it is exported for a manual clean-up.
func Sweep(log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	stale := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		m := nsNameRE.FindStringSubmatch(f[0])
		if m == nil {
			continue
		}
		id := Prefix + m[1]
		isStale, seen := stale[id]
		if !seen {
			isStale = !markerAlive(id)
			stale[id] = isStale
		}
		if isStale {
			killNetnsPids(f[0])
			exec.Command("ip", "netns", "del", f[0]).Run()
			log.Info("netlab: removed stale namespace", "netns", f[0])
		}
	}
	ents, _ := os.ReadDir(markerDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), Prefix) && !markerAlive(e.Name()) {
			os.Remove(filepath.Join(markerDir, e.Name()))
		}
	}
}
