package main

// The configurations under test and how each is put in place in the lab's node namespace.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type kind int

const (
	kNoFilter kind = iota
	kConntrack
	kBare
	kIptables
	kSluice
	kCLoop // the C accept-all loop over libnetfilter_queue (bench/cnfqueue)
	kNfq   // the Go accept-all loop over sluice's own reader (filter/nfq)
)

type config struct {
	Name     string `json:"name"`
	kind     kind
	Queues   int    `json:"queues"`
	Mode     string `json:"mode"` // new-only or queue-all (bare and sluice)
	Offload  bool   `json:"offload"`
	Policies int    `json:"policies,omitempty"` // iptables and sluice only
}

func (c config) label() string {
	s := c.Name
	if c.Policies > 0 {
		s += fmt.Sprintf(" (%d pol)", c.Policies)
	}
	return s
}

const firstQueue = 100

// active is a configuration in place: rules installed and, for queue readers, the reader running.
type active struct {
	cfg     config
	proc    *exec.Cmd // bare loop or agent; nil for rule-only configurations
	logPath string
	metrics string // agent metrics address inside the node namespace
	exited  chan error
}

func (h *harness) resetNode() error {
	// An empty filter table: flushes every rule and deletes every chain, in the lab node only.
	cmd := h.lab.NodeCommand("iptables-restore")
	cmd.Stdin = strings.NewReader("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("reset node rules: %v: %s", err, out)
	}
	h.lab.NodeCommand("conntrack", "-F").Run()
	return nil
}

func (h *harness) restore(script string) error {
	cmd := h.lab.NodeCommand("iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("iptables-restore in the lab node: %v: %s", err, out)
	}
	return nil
}

func queueTarget(q int) string {
	if q <= 1 {
		return fmt.Sprintf("-j NFQUEUE --queue-num %d", firstQueue)
	}
	return fmt.Sprintf("-j NFQUEUE --queue-balance %d:%d", firstQueue, firstQueue+q-1)
}

func (h *harness) start(ctx context.Context, c config) (*active, error) {
	if err := h.resetNode(); err != nil {
		return nil, err
	}
	a := &active{cfg: c}
	switch c.kind {
	case kNoFilter:
	case kConntrack:
		if err := h.restore("*filter\n-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A FORWARD -m conntrack --ctstate NEW -j ACCEPT\nCOMMIT\n"); err != nil {
			return nil, err
		}
	case kIptables:
		if err := h.restore(iptablesPolicies(c.Policies)); err != nil {
			return nil, err
		}
	case kBare, kCLoop, kNfq:
		qargs := []string{"-queue-num", strconv.Itoa(firstQueue), "-queues", strconv.Itoa(c.Queues)}
		switch c.kind {
		case kBare:
			a.logPath = filepath.Join(h.tmp, "bare.log")
			a.proc = h.inNetns(h.lab.Node().Netns, append([]string{h.self, roleArg, "bare"}, qargs...)...)
		case kNfq:
			a.logPath = filepath.Join(h.tmp, "bare-nfq.log")
			qargs = append(qargs, strings.Fields(h.o.nfqArgs)...)
			a.proc = h.inNetns(h.lab.Node().Netns, append([]string{h.self, roleArg, "bare-nfq"}, qargs...)...)
		case kCLoop:
			if h.cloop == "" {
				return nil, errors.New("the C loop did not build (see the notes)")
			}
			a.logPath = filepath.Join(h.tmp, "c-nfqueue.log")
			a.proc = h.inNetns(h.lab.Node().Netns, append([]string{h.cloop}, qargs...)...)
		}
		if err := h.launch(a); err != nil {
			return nil, err
		}
		rule := "-A FORWARD -m conntrack --ctstate NEW " + queueTarget(c.Queues)
		if c.Mode == "queue-all" {
			rule = "-A FORWARD " + queueTarget(c.Queues)
		}
		if err := h.restore("*filter\n" + rule + "\nCOMMIT\n"); err != nil {
			h.stop(a)
			return nil, err
		}
	case kSluice:
		if h.sluice == "" {
			return nil, errors.New("no sluice binary")
		}
		state := filepath.Join(h.tmp, fmt.Sprintf("state-%d.json", c.Policies))
		if _, err := os.Stat(state); err != nil {
			if err := writeState(state, c.Policies); err != nil {
				return nil, err
			}
		}
		a.metrics = "127.0.0.1:9477"
		args := []string{"agent", "--state", state, "--queue-num", strconv.Itoa(firstQueue),
			"--queues", strconv.Itoa(c.Queues), "--mode", c.Mode, "--metrics-addr", a.metrics,
			// Like the bare loop: a full queue drops, so every packet counted went through
			// the reader. New TCP connections never fill it (one SYN per client in flight).
			"--fail-open=false",
			// Off: every client pod here opens more connections per second than the default
			// per-source admission limit (2000 packets/s) lets into the queue, and the benchmark
			// measures the queue path, not that defence (which drops the excess by design).
			"--admission-rate=0"}
		if c.Offload {
			args = append(args, "--offload")
		}
		a.logPath = filepath.Join(h.tmp, "agent-"+strings.ReplaceAll(c.Name, " ", "_")+".log")
		a.proc = h.inNetns(h.lab.Node().Netns, append([]string{h.sluice}, args...)...)
		if h.o.agentEnv != "" {
			a.proc.Env = append(os.Environ(), strings.Split(h.o.agentEnv, ",")...)
		}
		if err := h.launch(a); err != nil {
			return nil, err
		}
	}
	if err := h.waitReady(ctx, a); err != nil {
		h.stop(a)
		return nil, err
	}
	return a, nil
}

// inNetns prepares a process of the benchmark inside a lab namespace, at the harness's CPU
// priority (-nice): on a machine shared with other work, every process under test gets the
// same raised priority so background jobs disturb the comparison less.
func (h *harness) inNetns(netns string, argv ...string) *exec.Cmd {
	args := []string{"netns", "exec", netns}
	args = append(args, argv...)
	if h.o.nice != 0 {
		return exec.Command("nice", append([]string{"-n", strconv.Itoa(h.o.nice), "ip"}, args...)...)
	}
	return exec.Command("ip", args...)
}

func (h *harness) launch(a *active) error {
	f, err := os.Create(a.logPath)
	if err != nil {
		return err
	}
	a.proc.Stdout, a.proc.Stderr = f, f
	if err := a.proc.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", a.proc.Path, err)
	}
	a.exited = make(chan error, 1)
	go func() { a.exited <- a.proc.Wait(); f.Close() }()
	return nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitReady waits (bounded) until the configuration passes traffic: a reader must have its queue
// bound and, for sluice, its rules installed; then a probe connection must get through.
func (h *harness) waitReady(ctx context.Context, a *active) error {
	deadline := time.Now().Add(45 * time.Second)
	for {
		if a.exited != nil {
			select {
			case err := <-a.exited:
				a.exited <- err
				return fmt.Errorf("%s exited during start-up (%v); last log lines:\n%s", a.cfg.Name, err, tail(a.logPath, 15))
			default:
			}
		}
		ok := true
		if a.proc != nil {
			ok = h.nodeHasQueueRule()
		}
		if ok {
			if h.connects(time.Second) {
				return nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			msg := ""
			if a.logPath != "" {
				msg = "; last log lines:\n" + tail(a.logPath, 15)
			}
			return fmt.Errorf("%s not passing traffic after 45s%s", a.cfg.Name, msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// connects reports whether one TCP connection from the client pod to the server gets through.
func (h *harness) connects(timeout time.Duration) bool {
	return h.clients[0].Do(func() error {
		c, err := net.DialTimeout("tcp4", fmt.Sprintf("%s:%d", serverIP, tcpPort), timeout)
		if err != nil {
			return err
		}
		return c.Close()
	}) == nil
}

// stop ends the reader (SIGTERM, so the agent removes its rules) and resets the node.
func (h *harness) stop(a *active) {
	if a == nil {
		return
	}
	if a.proc != nil && a.proc.Process != nil {
		a.proc.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-a.exited:
			a.exited <- err
		case <-time.After(10 * time.Second):
			a.proc.Process.Kill()
			<-a.exited
		}
		if a.cfg.kind == kSluice {
			// The agent runs fail-closed here, and a fail-closed agent leaves its rules in force
			// for the next one to adopt: remove them (and its sets) as an operator would, so
			// that no configuration measures through another's rules. Note it when that fails.
			cmd := h.inNetns(h.lab.Node().Netns, h.sluice, "agent", "--cleanup")
			if out, err := cmd.CombinedOutput(); err != nil {
				h.note("sluice agent --cleanup after %s failed: %v: %s", a.cfg.Name, err, firstLines(string(out), 3))
			}
			if h.nodeHasQueueRule() {
				h.note("NFQUEUE rules left behind after stopping %s and sluice agent --cleanup", a.cfg.Name)
			}
		}
	}
	h.resetNode()
}

// nodeHasQueueRule looks for an NFQUEUE rule in the node with both iptables back ends: the
// agent picks the one the kernel offers, which need not be the harness's.
func (h *harness) nodeHasQueueRule() bool {
	for _, save := range []string{"iptables-save", "iptables-legacy-save", "ip6tables-save"} {
		if _, err := exec.LookPath(save); err != nil {
			continue
		}
		if out, _ := h.lab.NodeExec(save); strings.Contains(out, "NFQUEUE") {
			return true
		}
	}
	return false
}

func (a *active) pid() int {
	if a.proc == nil || a.proc.Process == nil {
		return 0
	}
	return a.proc.Process.Pid
}

// procCPU returns user and system CPU seconds of pid from /proc.
func procCPU(pid int) (user, sys float64) {
	if pid == 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 13 {
		return 0, 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	y, _ := strconv.ParseFloat(f[12], 64)
	const hz = 100 // USER_HZ is 100 on every Linux ABI Go supports
	return u / hz, y / hz
}

// machineBusy returns busy and total jiffies of all CPUs.
func machineBusy() (busy, total float64) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0
	}
	fs := strings.Fields(sc.Text())
	for i, v := range fs[1:] {
		x, _ := strconv.ParseFloat(v, 64)
		total += x
		if i != 3 && i != 4 { // idle, iowait
			busy += x
		}
	}
	return busy, total
}

// httpInNode fetches a URL from inside the node namespace (the agent's metrics listen there).
func (h *harness) httpInNode(url string, timeout time.Duration) ([]byte, int, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := h.lab.Node().Do(func() (err error) {
			d := net.Dialer{Timeout: 2 * time.Second}
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}, DisableKeepAlives: true}
	cl := &http.Client{Transport: tr, Timeout: timeout}
	resp, err := cl.Get(url)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return b, resp.StatusCode, err
}

// server is the long-lived server pod process.
type server struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func (h *harness) startServer() error {
	cmd := h.inNetns(h.server.Netns, h.self, roleArg, "server",
		"-tcp", fmt.Sprintf("%s:%d", serverIP, tcpPort), "-udp", fmt.Sprintf("%s:%d", serverIP, udpPort))
	in, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	s := &server{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	if !s.out.Scan() {
		cmd.Process.Kill()
		cmd.Wait()
		return errors.New("bench server did not start")
	}
	h.srv = s
	return nil
}

type serverCounts struct {
	Accepted uint64 `json:"accepted"`
	UDP      uint64 `json:"udp"`
}

func (s *server) counts() (serverCounts, error) {
	var c serverCounts
	if _, err := io.WriteString(s.in, "stat\n"); err != nil {
		return c, err
	}
	if !s.out.Scan() {
		return c, errors.New("bench server gone")
	}
	return c, json.Unmarshal(s.out.Bytes(), &c)
}

func (s *server) close() {
	if s == nil {
		return
	}
	s.in.Close()
	done := make(chan struct{})
	go func() { s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		s.cmd.Process.Kill()
		<-done
	}
}
