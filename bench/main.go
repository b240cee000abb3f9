// Command bench measures what sluice costs, side by side with no filter, a conntrack rule, the
// bare NFQUEUE ceiling and the same policies as plain iptables rules, with real packets through a
// network-namespace lab on this machine.
//
//	go run ./bench -quick      # < 1 min; last line: JSON with sluice_vs_bare_nfqueue, sluice_vs_no_filter
//	go run ./bench             # full run (make bench); rewrites bench/RESULTS.md and its plots
//
// Must run as root (namespaces, iptables). Everything it creates lives in its own lab
// namespaces, removed on exit and on SIGINT/SIGTERM.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluice-dev/sluice/internal/netlab"
)

type options struct {
	quick     bool
	out       string
	runs      int
	duration  time.Duration
	clients   []int
	policies  []int
	base      int
	sluice    string
	micro     bool
	benchtime time.Duration
	pprof     bool
	only      string
	render    bool
	agentEnv  string
	nfqArgs   string
	nice      int
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

func main() {
	if runRole(os.Args[1:]) {
		return
	}
	var o options
	var clients, policies string
	flag.BoolVar(&o.quick, "quick", false, "short run (< 1 min): no filter, bare NFQUEUE and sluice only; prints the JSON summary last")
	flag.StringVar(&o.out, "out", "bench/RESULTS.md", "report to rewrite (full run only); plots are written beside it")
	flag.IntVar(&o.runs, "runs", 0, "rounds: every measurement is repeated once per round (default 5, quick 3)")
	flag.DurationVar(&o.duration, "duration", 0, "length of one measurement (default 1s)")
	flag.StringVar(&clients, "clients", "", "concurrent client counts (default 1,4,16; quick 4)")
	flag.StringVar(&policies, "policies", "10,1000,10000", "policy counts for the scaling runs")
	flag.IntVar(&o.base, "base-policies", 1000, "policy count for the client-scaling runs")
	flag.StringVar(&o.sluice, "sluice", "", "sluice binary (default: go build ./cmd/sluice into a temporary directory)")
	flag.BoolVar(&o.micro, "micro", true, "run the micro benchmarks (full run only)")
	flag.DurationVar(&o.benchtime, "benchtime", 300*time.Millisecond, "time per micro benchmark")
	flag.BoolVar(&o.pprof, "pprof", true, "profile the queue readers (agent: its /debug/pprof, else perf; bare loop: perf) at the top client count")
	flag.StringVar(&o.only, "only", "", "run only the configurations whose label matches this regular expression")
	flag.StringVar(&o.agentEnv, "agent-env", "", "extra environment for the agent, comma-separated KEY=VALUE (e.g. GOGC=400) to try runtime settings")
	flag.StringVar(&o.nfqArgs, "nfq-args", "", "extra flags for the bare loop over filter/nfq, space-separated (e.g. \"-batch 1\" or \"-batch-verdict\") to compare its receive and verdict modes")
	flag.IntVar(&o.nice, "nice", -5, "CPU priority (nice value) of every process under test; raised so other work on a shared machine disturbs the comparison less (0: leave as is)")
	flag.BoolVar(&o.render, "render", false, "rewrite -out (and its plots) from the raw results.json beside it, without measuring (e.g. after editing ANALYSIS.md)")
	flag.Parse()
	if o.render {
		if err := rerender(o.out); err != nil {
			fatal("%v", err)
		}
		return
	}
	if o.runs == 0 {
		o.runs = 5
		if o.quick {
			o.runs = 3
		}
	}
	if o.duration == 0 {
		o.duration = time.Second
		if o.quick {
			o.duration = time.Second
		}
	}
	if clients == "" {
		clients = "1,4,16"
		if o.quick {
			clients = "4"
		}
	}
	var err error
	if o.clients, err = parseInts(clients); err != nil {
		fatal("-clients: %v", err)
	}
	if o.policies, err = parseInts(policies); err != nil {
		fatal("-policies: %v", err)
	}
	if o.runs > 20 || o.duration > time.Minute {
		fatal("-runs at most 20 and -duration at most 1m: every run must stay bounded")
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	sum, err := run(ctx, o, os.Stderr)
	if sum != nil {
		b, _ := json.Marshal(sum)
		fmt.Println(string(b))
	}
	if err != nil {
		fatal("%v", err)
	}
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	os.Exit(1)
}

type harness struct {
	o             options
	lab           *netlab.Lab
	clients       []*netlab.Host
	server        *netlab.Host
	self, sluice  string
	cloop         string // the C loop's binary, "" when it did not build
	tmp           string
	srv           *server
	log           io.Writer
	notes         []string
	results       []*result
	agentHist     map[string]histSummary
	microRes      []microResult
	profiles      map[string]string
	command       string
	machine       machineInfo
	started       time.Time
	planned, done int
}

func (h *harness) progress(format string, args ...any) {
	fmt.Fprintf(h.log, "%s "+format+"\n", append([]any{time.Since(h.started).Truncate(100 * time.Millisecond)}, args...)...)
}

func (h *harness) note(format string, args ...any) {
	n := fmt.Sprintf(format, args...)
	h.notes = append(h.notes, n)
	h.progress("NOTE: %s", n)
}

// run is the whole harness; the summary it returns is the JSON line.
func run(ctx context.Context, o options, log io.Writer) (*summary, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root: the lab uses network namespaces and iptables")
	}
	for _, b := range []string{"ip", "iptables", "iptables-restore", "iptables-save", "conntrack"} {
		if _, err := exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("%s is missing: run hack/deps.sh (or make deps)", b)
		}
	}
	h := &harness{o: o, log: log, started: time.Now(), agentHist: map[string]histSummary{}, profiles: map[string]string{},
		command: strings.TrimSpace("go run ./bench " + strings.Join(os.Args[1:], " "))}
	h.machine = describeMachine()
	var err error
	if h.self, err = os.Executable(); err != nil {
		return nil, err
	}
	if h.tmp, err = os.MkdirTemp("", "sluice-bench-"); err != nil {
		return nil, err
	}
	defer os.RemoveAll(h.tmp)

	h.sluice = o.sluice
	if h.sluice == "" {
		h.progress("building sluice (go build ./cmd/sluice)")
		bin := filepath.Join(h.tmp, "sluice")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/sluice")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			h.note("sluice did not build, its configurations are skipped: %v: %s", err, firstLines(string(out), 5))
		} else {
			h.sluice = bin
		}
	}
	if h.sluice != "" {
		if out, err := exec.Command(h.sluice, "agent", "--help").CombinedOutput(); err != nil {
			h.note("`sluice agent` is not available, its configurations are skipped: %v: %s", err, firstLines(string(out), 3))
			h.sluice = ""
		}
	}

	h.progress("building the C loop (gcc bench/cnfqueue/c-nfqueue.c)")
	if h.cloop, err = buildCLoop(ctx, h.tmp); err != nil {
		h.note("the C loop did not build, its configurations are skipped: %v", err)
	}

	if o.pprof && !o.quick {
		// `go run` strips the symbol table, which leaves perf's profile of the bare loop
		// without names; a plain build of the harness keeps them.
		bin := filepath.Join(h.tmp, "bench")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./bench")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err == nil {
			h.self = bin
		} else {
			h.progress("building the harness with symbols failed, profiles of the bare loop will lack names: %v: %s", err, firstLines(string(out), 3))
		}
	}
	if o.micro && !o.quick {
		h.progress("micro benchmarks (benchtime %s each)", o.benchtime)
		h.microRes = runMicro(o.policies, o.benchtime, h.progress)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	h.lab, err = netlab.New("bench", netlab.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		return nil, err
	}
	defer h.lab.Close()
	for i := 0; i < clientPods; i++ {
		c, err := h.lab.AddHost(fmt.Sprintf("client-%d", i), clientIP(i))
		if err != nil {
			return nil, err
		}
		c.Sysctl("net.ipv4.ip_local_port_range", "1024 65535")
		h.clients = append(h.clients, c)
	}
	if h.server, err = h.lab.AddHost("server", serverIP); err != nil {
		return nil, err
	}
	h.server.Sysctl("net.core.somaxconn", "8192")
	h.server.Sysctl("net.ipv4.tcp_max_syn_backlog", "8192")
	h.lab.Node().Sysctl("net.netfilter.nf_conntrack_max", "1048576")
	if err := h.startServer(); err != nil {
		return nil, err
	}
	defer h.srv.close()
	h.progress("lab %s ready: %d client pods %s.. -> node -> server %s", h.lab.ID, clientPods, clientIP(0), serverIP)

	plan := h.plan()
	if o.only != "" {
		re, err := regexp.Compile(o.only)
		if err != nil {
			return nil, fmt.Errorf("-only: %w", err)
		}
		plan = slices.DeleteFunc(plan, func(st step) bool { return !re.MatchString(st.cfg.label()) })
	}
	for _, st := range plan {
		h.planned += len(st.workloads) * o.runs
	}
	// Rounds are the outer loop: every configuration is measured once per round, so a slow
	// drift in the machine's background load (it is shared) spreads over all of them instead of
	// landing on whichever configuration happened to run at that moment.
	for round := 0; round < o.runs && ctx.Err() == nil; round++ {
		for _, st := range plan {
			if ctx.Err() != nil {
				break
			}
			h.step(ctx, st, round)
		}
	}
	if ctx.Err() != nil {
		return h.summary(), fmt.Errorf("interrupted: %w", ctx.Err())
	}
	sum := h.summary()
	if !o.quick {
		if err := h.writeReport(sum); err != nil {
			return sum, err
		}
		h.progress("wrote %s", o.out)
	}
	return sum, nil
}

// repoRoot finds the module root, so the harness works from the repository root (go run) and
// from bench/ (go test).
func repoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	return dir
}

func firstLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, " | ")
}

type workload struct {
	mode    string // tcp or udp
	clients int
	profile bool
}

type step struct {
	cfg       config
	workloads []workload
}

func sluiceCfg(name string, queues int, mode string, offload bool, pol int) config {
	return config{Name: name, kind: kSluice, Queues: queues, Mode: mode, Offload: offload, Policies: pol}
}

func (h *harness) plan() []step {
	o := h.o
	tcp := func(cs ...int) []workload {
		var w []workload
		for _, c := range cs {
			w = append(w, workload{mode: "tcp", clients: c})
		}
		return w
	}
	var s []step
	if o.quick {
		s = []step{
			{config{Name: "no-filter", kind: kNoFilter}, tcp(o.clients...)},
			{config{Name: "c-nfqueue", kind: kCLoop, Queues: 1, Mode: "new-only"}, tcp(o.clients...)},
			{config{Name: "bare-nfqueue", kind: kBare, Queues: 1, Mode: "new-only"}, tcp(o.clients...)},
			{config{Name: "bare-nfq", kind: kNfq, Queues: 1, Mode: "new-only"}, tcp(o.clients...)},
		}
		if h.sluice != "" {
			s = append(s,
				step{sluiceCfg("sluice", 1, "new-only", false, o.base), tcp(o.clients...)},
				step{sluiceCfg("sluice+offload", 1, "new-only", true, o.base), tcp(o.clients...)})
		}
		return s
	}
	top := slices.Max(o.clients)
	// Every queue reader is profiled at the top client count.
	profiled := func() []workload {
		w := tcp(o.clients...)
		w[len(w)-1].profile = o.pprof
		return w
	}
	s = []step{
		{config{Name: "no-filter", kind: kNoFilter}, tcp(o.clients...)},
		{config{Name: "conntrack", kind: kConntrack}, tcp(o.clients...)},
		{config{Name: "c-nfqueue", kind: kCLoop, Queues: 1, Mode: "new-only"}, profiled()},
		{config{Name: "bare-nfqueue", kind: kBare, Queues: 1, Mode: "new-only"}, profiled()},
		{config{Name: "bare-nfq", kind: kNfq, Queues: 1, Mode: "new-only"}, profiled()},
		{config{Name: "iptables-policies", kind: kIptables, Policies: o.base}, tcp(o.clients...)},
	}
	if h.sluice != "" {
		s = append(s,
			step{sluiceCfg("sluice", 1, "new-only", false, o.base), profiled()},
			step{sluiceCfg("sluice+offload", 1, "new-only", true, o.base), tcp(o.clients...)},
			step{sluiceCfg("sluice queue-all", 1, "queue-all", false, o.base), tcp(o.clients...)},
			step{sluiceCfg("sluice 2 queues", 2, "new-only", false, o.base), tcp(top)},
			step{sluiceCfg("sluice 4 queues", 4, "new-only", false, o.base), tcp(top)},
		)
	}
	// UDP through the queue: every datagram is queued, so this is the per-packet cost.
	udpW := []workload{{mode: "udp", clients: 8}}
	s = append(s, step{config{Name: "c-nfqueue queue-all 1q", kind: kCLoop, Queues: 1, Mode: "queue-all"}, udpW})
	s = append(s, step{config{Name: "bare-nfq queue-all 1q", kind: kNfq, Queues: 1, Mode: "queue-all"}, udpW})
	for _, q := range []int{1, 2, 4} {
		s = append(s, step{config{Name: fmt.Sprintf("bare-nfqueue queue-all %dq", q), kind: kBare, Queues: q, Mode: "queue-all"}, udpW})
	}
	if h.sluice != "" {
		for _, q := range []int{1, 2, 4} {
			s = append(s, step{sluiceCfg(fmt.Sprintf("sluice queue-all %dq", q), q, "queue-all", false, o.base), udpW})
		}
	}
	// Scaling with the number of policies, at a middle client count.
	mid := o.clients[len(o.clients)/2]
	for _, n := range o.policies {
		if n == o.base {
			continue // measured above with every client count
		}
		s = append(s, step{config{Name: "iptables-policies", kind: kIptables, Policies: n}, tcp(mid)})
		if h.sluice != "" {
			s = append(s,
				step{sluiceCfg("sluice", 1, "new-only", false, n), tcp(mid)},
				step{sluiceCfg("sluice+offload", 1, "new-only", true, n), tcp(mid)})
		}
	}
	return s
}

// runResult is one measurement.
type runResult struct {
	Rate      float64 `json:"rate"` // new TCP connections/s, or UDP datagrams/s received
	Sent      float64 `json:"sent_rate,omitempty"`
	P50us     float64 `json:"p50_us,omitempty"`
	P99us     float64 `json:"p99_us,omitempty"`
	Errors    uint64  `json:"errors"`
	ReaderCPU float64 `json:"reader_cpu_us_per_op"` // queue reader's user+sys CPU per connection/datagram
	ReaderSys float64 `json:"reader_sys_us_per_op"`
	Busy      float64 `json:"machine_busy"` // fraction of all CPUs busy during the run
}

type result struct {
	Cfg     config      `json:"config"`
	Mode    string      `json:"workload"`
	Clients int         `json:"clients"`
	Runs    []runResult `json:"runs"`
	Failed  string      `json:"failed,omitempty"`
}

func (h *harness) resultFor(c config, w workload) *result {
	for _, r := range h.results {
		if r.Cfg == c && r.Mode == w.mode && r.Clients == w.clients {
			return r
		}
	}
	r := &result{Cfg: c, Mode: w.mode, Clients: w.clients}
	h.results = append(h.results, r)
	return r
}

func (h *harness) step(ctx context.Context, st step, round int) {
	h.progress("=== %s (round %d/%d): starting", st.cfg.label(), round+1, h.o.runs)
	a, err := h.start(ctx, st.cfg)
	if err != nil {
		h.note("%s could not start (round %d): %v", st.cfg.label(), round+1, err)
		for _, w := range st.workloads {
			h.resultFor(st.cfg, w).Failed = err.Error()
			h.done++
		}
		return
	}
	defer h.stop(a)
	for _, w := range st.workloads {
		if ctx.Err() != nil {
			return
		}
		res := h.resultFor(st.cfg, w)
		var prof chan string
		if w.profile && round == 0 {
			prof = h.captureProfile(a)
			// Let the profiler attach before the load starts, so it covers the run.
			time.Sleep(300 * time.Millisecond)
		}
		rr, err := h.measure(ctx, a, w)
		if prof != nil {
			if top := <-prof; top != "" {
				h.profiles[fmt.Sprintf("%s, %s, %d clients", st.cfg.label(), w.mode, w.clients)] = top
			}
		}
		h.done++
		if err != nil {
			res.Failed = err.Error()
			h.note("%s %s clients=%d round %d: %v", st.cfg.label(), w.mode, w.clients, round+1, err)
			continue
		}
		res.Runs = append(res.Runs, rr)
		unit := "conn/s"
		if w.mode == "udp" {
			unit = "dgram/s"
		}
		h.progress("[%d/%d] %-30s %s clients=%-2d round %d/%d: %8.0f %s  p50 %6.0fµs p99 %7.0fµs  reader %5.1f µs/op (sys %5.1f)  errors %d",
			h.done, h.planned, st.cfg.label(), w.mode, w.clients, round+1, h.o.runs, rr.Rate, unit, rr.P50us, rr.P99us, rr.ReaderCPU, rr.ReaderSys, rr.Errors)
	}
	if a.metrics != "" {
		if hs, err := h.scrapeHist(a); err != nil {
			h.progress("agent metrics for %s: %v", st.cfg.label(), err)
		} else {
			h.agentHist[st.cfg.label()] = hs
			h.progress("  agent %s: %d samples, mean %.1fµs p50 %.1fµs p99 %.1fµs", hs.Metric, hs.Count, hs.MeanUs, hs.P50us, hs.P99us)
		}
	}
}

func (h *harness) measure(ctx context.Context, a *active, w workload) (runResult, error) {
	var rr runResult
	h.lab.NodeCommand("conntrack", "-F").Run()
	if a.exited != nil {
		select {
		case err := <-a.exited:
			a.exited <- err
			return rr, fmt.Errorf("queue reader exited (%v); last log lines:\n%s", err, tail(a.logPath, 10))
		default:
		}
	}
	addr := fmt.Sprintf("%s:%d", serverIP, tcpPort)
	if w.mode == "udp" {
		addr = fmt.Sprintf("%s:%d", serverIP, udpPort)
	}
	rctx, cancel := context.WithTimeout(ctx, h.o.duration+20*time.Second)
	defer cancel()
	// The client threads are spread over the client pods (one load process per pod).
	pods := min(w.clients, len(h.clients))
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for i := 0; i < pods; i++ {
		n := w.clients / pods
		if i < w.clients%pods {
			n++
		}
		var argv []string
		if w.mode == "udp" {
			// Senders that never block would otherwise take the CPUs from the queue reader
			// they are measuring; at a lower priority they only use what the reader leaves.
			argv = append(argv, "nice", "-n", "15")
		}
		argv = append(argv, h.self, roleArg, "load", "-mode", w.mode, "-addr", addr,
			"-clients", strconv.Itoa(n), "-duration", h.o.duration.String())
		c := h.inNetns(h.clients[i].Netns, argv...)
		cmd := exec.CommandContext(rctx, c.Path, c.Args[1:]...)
		cmd.Stderr = h.log
		out := &bytes.Buffer{}
		cmd.Stdout = out
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	before, err := h.srv.counts()
	if err != nil {
		return rr, err
	}
	u0, s0 := procCPU(a.pid())
	b0, t0 := machineBusy()
	for _, c := range cmds {
		if err := c.Start(); err != nil {
			return rr, fmt.Errorf("load generator: %w", err)
		}
	}
	var werr error
	for _, c := range cmds {
		if err := c.Wait(); err != nil && werr == nil {
			werr = fmt.Errorf("load generator: %w", err)
		}
	}
	if werr != nil {
		return rr, werr
	}
	if w.mode == "udp" {
		time.Sleep(100 * time.Millisecond) // let queued datagrams drain into the server's count
	}
	u1, s1 := procCPU(a.pid())
	b1, t1 := machineBusy()
	after, err := h.srv.counts()
	if err != nil {
		return rr, err
	}
	var lr loadResult
	hist := make([]uint64, latBuckets)
	for _, out := range outs {
		var one loadResult
		if err := json.Unmarshal(out.Bytes(), &one); err != nil {
			return rr, fmt.Errorf("load generator output %q: %w", out, err)
		}
		lr.Done += one.Done
		lr.Errors += one.Errors
		lr.Elapsed = max(lr.Elapsed, one.Elapsed)
		if lr.FirstErr == "" {
			lr.FirstErr = one.FirstErr
		}
		for i, c := range one.Hist {
			if i < len(hist) {
				hist[i] += c
			}
		}
	}
	if lr.Elapsed <= 0 {
		return rr, errors.New("load generator reported no elapsed time")
	}
	rr.Errors = lr.Errors
	if w.mode == "tcp" {
		rr.P50us, rr.P99us = histQuantile(hist, 0.5), histQuantile(hist, 0.99)
	}
	ops := float64(lr.Done)
	if w.mode == "udp" {
		ops = float64(after.UDP - before.UDP)
		rr.Sent = float64(lr.Done) / lr.Elapsed
	}
	rr.Rate = ops / lr.Elapsed
	if ops > 0 {
		rr.ReaderCPU = (u1 - u0 + s1 - s0) / ops * 1e6
		rr.ReaderSys = (s1 - s0) / ops * 1e6
	}
	if t1 > t0 {
		rr.Busy = (b1 - b0) / (t1 - t0)
	}
	if lr.FirstErr != "" && lr.Errors > 0 {
		h.progress("  load errors: %d (first: %s)", lr.Errors, lr.FirstErr)
	}
	return rr, nil
}
