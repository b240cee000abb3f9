package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// summary is the JSON line: the headline ratios first, then the figures they come from.
type summary struct {
	SluiceVsBare        *float64           `json:"sluice_vs_bare_nfqueue"`
	SluiceVsNoFilter    *float64           `json:"sluice_vs_no_filter"`
	OffloadVsBare       *float64           `json:"sluice_offload_vs_bare_nfqueue"`
	OffloadVsNoFilter   *float64           `json:"sluice_offload_vs_no_filter"`
	SluiceVsC           *float64           `json:"sluice_vs_c_nfqueue"`
	BareVsC             *float64           `json:"bare_vs_c_nfqueue"`
	NfqVsC              *float64           `json:"bare_nfq_vs_c_nfqueue"`
	Clients             int                `json:"clients"`
	ConnPerS            map[string]float64 `json:"conn_per_s"`
	AgentDecisionP99us  *float64           `json:"agent_decision_p99_us,omitempty"`
	Runs                int                `json:"runs"`
	DurationS           float64            `json:"duration_s"`
	ElapsedS            float64            `json:"elapsed_s"`
	Notes               []string           `json:"notes,omitempty"`
	SluiceNotMeasuredBy string             `json:"sluice_missing,omitempty"`
}

type stat struct{ med, lo, hi float64 }

func statOf(xs []float64) stat {
	if len(xs) == 0 {
		return stat{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{m, s[0], s[len(s)-1]}
}

func (r *result) stat(f func(runResult) float64) stat {
	var xs []float64
	for _, x := range r.Runs {
		xs = append(xs, f(x))
	}
	return statOf(xs)
}

func rate(r runResult) float64 { return r.Rate }

func (h *harness) find(name, mode string, clients, policies int) *result {
	for _, r := range h.results {
		if r.Cfg.Name == name && r.Mode == mode && r.Clients == clients && len(r.Runs) > 0 &&
			(policies == 0 || r.Cfg.Policies == policies) {
			return r
		}
	}
	return nil
}

func ratio(a, b *result) *float64 {
	if a == nil || b == nil {
		return nil
	}
	x, y := a.stat(rate).med, b.stat(rate).med
	if y == 0 {
		return nil
	}
	v := math.Round(x/y*1000) / 1000
	return &v
}

func (h *harness) headlineClients() int { return h.o.clients[len(h.o.clients)/2] }

func (h *harness) summary() *summary {
	c := h.headlineClients()
	nf := h.find("no-filter", "tcp", c, 0)
	bare := h.find("bare-nfqueue", "tcp", c, 0)
	sl := h.find("sluice", "tcp", c, h.o.base)
	off := h.find("sluice+offload", "tcp", c, h.o.base)
	cl := h.find("c-nfqueue", "tcp", c, 0)
	bnfq := h.find("bare-nfq", "tcp", c, 0)
	s := &summary{
		SluiceVsBare: ratio(sl, bare), SluiceVsNoFilter: ratio(sl, nf),
		OffloadVsBare: ratio(off, bare), OffloadVsNoFilter: ratio(off, nf),
		SluiceVsC: ratio(sl, cl), BareVsC: ratio(bare, cl), NfqVsC: ratio(bnfq, cl),
		Clients: c, ConnPerS: map[string]float64{}, Runs: h.o.runs, DurationS: h.o.duration.Seconds(),
		ElapsedS: math.Round(time.Since(h.started).Seconds()*10) / 10, Notes: h.notes,
	}
	for name, r := range map[string]*result{"no_filter": nf, "bare_nfqueue": bare, "sluice": sl, "sluice_offload": off,
		"c_nfqueue": cl, "bare_nfq": bnfq} {
		if r != nil {
			s.ConnPerS[name] = math.Round(r.stat(rate).med)
		}
	}
	if hs, ok := h.agentHist[sluiceCfg("sluice", 1, "new-only", false, h.o.base).label()]; ok && hs.Count > 0 {
		v := math.Round(hs.P99us*10) / 10
		s.AgentDecisionP99us = &v
	}
	if h.sluice == "" {
		s.SluiceNotMeasuredBy = "sluice agent not available; see notes"
	}
	return s
}

// histSummary is the agent's own per-packet decision-latency histogram, read from /metrics.
type histSummary struct {
	Metric      string
	Count       uint64
	P50us       float64
	P99us       float64
	MeanUs      float64
	OtherFamily []string
}

func (h *harness) scrapeHist(a *active) (histSummary, error) {
	var hs histSummary
	body, code, err := h.httpInNode("http://"+a.metrics+"/metrics", 5*time.Second)
	if err != nil {
		return hs, err
	}
	if code != 200 {
		return hs, fmt.Errorf("GET /metrics: HTTP %d", code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return hs, fmt.Errorf("parse /metrics: %w", err)
	}
	// The per-packet time is the histogram whose name speaks of decisions or verdicts; take
	// the first such one in name order so the choice is stable.
	var names []string
	for n, f := range fams {
		if f.GetType() == dto.MetricType_HISTOGRAM && strings.HasPrefix(n, "sluice") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var pick string
	for _, key := range []string{"decision", "verdict", "packet", "latency", "duration"} {
		for _, n := range names {
			if strings.Contains(n, key) && pick == "" {
				pick = n
			}
		}
	}
	if pick == "" {
		return hs, fmt.Errorf("no sluice_* histogram in /metrics (histograms: %v)", names)
	}
	hs.Metric = pick
	hs.OtherFamily = names
	// Sum the buckets of every series (one per worker or verdict label).
	bounds := map[float64]uint64{}
	var count uint64
	var sum float64
	for _, m := range fams[pick].GetMetric() {
		hg := m.GetHistogram()
		count += hg.GetSampleCount()
		sum += hg.GetSampleSum()
		for _, b := range hg.GetBucket() {
			bounds[b.GetUpperBound()] += b.GetCumulativeCount()
		}
	}
	hs.Count = count
	if count == 0 {
		return hs, nil
	}
	hs.MeanUs = sum / float64(count) * 1e6
	var ub []float64
	for b := range bounds {
		ub = append(ub, b)
	}
	sort.Float64s(ub)
	q := func(p float64) float64 {
		target := p * float64(count)
		prevB, prevC := 0.0, 0.0
		for _, b := range ub {
			c := float64(bounds[b])
			if c >= target {
				if math.IsInf(b, 1) {
					return prevB * 1e6
				}
				// Linear inside the bucket, as Prometheus's histogram_quantile does.
				if c == prevC {
					return b * 1e6
				}
				return (prevB + (b-prevB)*(target-prevC)/(c-prevC)) * 1e6
			}
			prevB, prevC = b, c
		}
		return prevB * 1e6
	}
	hs.P50us, hs.P99us = q(0.5), q(0.99)
	return hs, nil
}

// captureProfile profiles the queue reader during the next run and answers with a text top
// list, or "" when no profiler is available. The agent's own /debug/pprof is preferred; without
// it, perf samples the process (user and kernel stacks: the verdict syscall re-injects the
// packet, so the kernel's forwarding runs on the reader's thread and shows up here too).
func (h *harness) captureProfile(a *active) chan string {
	ch := make(chan string, 1)
	secs := max(1, int(h.o.duration.Seconds()))
	go func() {
		if a.metrics != "" {
			body, code, err := h.httpInNode(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", a.metrics, secs), time.Duration(secs+15)*time.Second)
			if err == nil && code == 200 {
				f := filepath.Join(h.tmp, "agent.pprof")
				os.WriteFile(f, body, 0o644)
				out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=30", h.sluice, f).CombinedOutput()
				if err == nil {
					ch <- "go tool pprof -top (agent's /debug/pprof/profile)\n" + trimProfile(string(out))
					return
				}
			}
		}
		if _, err := exec.LookPath("perf"); err != nil || a.pid() == 0 {
			h.note("no CPU profile of %s: the agent serves no /debug/pprof and perf is not installed", a.cfg.label())
			ch <- ""
			return
		}
		f := filepath.Join(h.tmp, "perf.data")
		rec := exec.Command("perf", "record", "-q", "-F", "4999", "-g", "-p", fmt.Sprint(a.pid()), "-o", f, "--", "sleep", fmt.Sprintf("%.2f", h.o.duration.Seconds()+0.2))
		if out, err := rec.CombinedOutput(); err != nil {
			h.note("perf record of %s failed: %v: %s", a.cfg.label(), err, firstLines(string(out), 3))
			ch <- ""
			return
		}
		rep := exec.Command("perf", "report", "-i", f, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none", "--percent-limit", "1")
		out, err := rep.Output()
		if err != nil {
			h.note("perf report failed: %v", err)
			ch <- ""
			return
		}
		var keep []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(l) == "" || strings.HasPrefix(l, "#") {
				continue
			}
			keep = append(keep, strings.TrimRight(l, " "))
		}
		byDSO, _ := exec.Command("perf", "report", "-i", f, "--stdio", "--no-children", "--sort", "dso", "-g", "none", "--percent-limit", "1").Output()
		var dso []string
		for _, l := range strings.Split(string(byDSO), "\n") {
			if strings.TrimSpace(l) != "" && !strings.HasPrefix(l, "#") {
				dso = append(dso, strings.TrimRight(l, " "))
			}
		}
		// Inclusive time of the steps of a queued packet's round trip, to tell the verdict
		// syscall (which carries the re-injected packet through the rest of the kernel) from
		// the wait for the next packet and from the user-space decision itself.
		incl, _ := exec.Command("perf", "report", "-i", f, "--stdio", "--children", "--sort", "sym", "-g", "none", "--percent-limit", "0.3").Output()
		var steps []string
		for _, l := range strings.Split(string(incl), "\n") {
			if strings.TrimSpace(l) != "" && !strings.HasPrefix(l, "#") && profileStep.MatchString(l) {
				steps = append(steps, strings.TrimRight(l, " "))
			}
		}
		ch <- "perf record -g -p PID (" + fmt.Sprint(secs) + " s), self time by object:\n" + strings.Join(dso, "\n") +
			"\n\nself time by symbol (user and kernel):\n" + strings.Join(keep, "\n") +
			"\n\ninclusive time (children, self) of the steps of a packet's round trip:\n" + strings.Join(steps, "\n") + "\n"
	}()
	return ch
}

var profileStep = regexp.MustCompile(`\] (__sys_sendmsg|__sys_recvmsg|____sys_recvmsg|netlink_sendmsg|netlink_recvmsg|__sys_sendto|__sys_recvfrom|do_recvmmsg|ksys_write|mnl_socket_recvfrom|mnl_socket_sendto|mnl_cb_run|.*nfq\.\(\*Queue\)\.(Serve|recv|handle)|nfqnl_recv_verdict|nf_reinject|nfqnl_enqueue_packet|ip_forward|ip_forward_finish|tcp_v4_rcv|__netif_receive_skb|do_epoll_wait|schedule|futex_wait|filter\.\(\*worker\)\.(hook|handle)|github.com/sluice-dev/sluice/filter\.\(\*worker\)\.(hook|handle)|.*policy\.\(\*Snapshot\)\.Decide|.*\(\*FlowCache\)\.Decide|.*\(\*Decoder\)\.Decode|.*\(\*Offload\)\.Record|runtime\.mallocgc|runtime\.gcBgMarkWorker|runtime\.findRunnable|runtime\.netpoll|.*nfqueue\.parseMsg|.*nfqueue\.\(\*Nfqueue\)\.setVerdict|.*netlink\.\(\*Conn\)\.(Receive|Send)|.*prometheus.*Observe)\b`)

type machineInfo struct {
	CPUs    int
	Kernel  string
	CPU     string
	Go      string
	Commit  string
	Started time.Time
}

func describeMachine() machineInfo {
	m := machineInfo{CPUs: runtime.NumCPU(), Go: runtime.Version(), Started: time.Now().UTC()}
	if out, err := exec.Command("uname", "-sr").Output(); err == nil {
		m.Kernel = strings.TrimSpace(string(out))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if i := strings.IndexByte(l, ':'); i > 0 {
					m.CPU = strings.TrimSpace(l[i+1:])
				}
				break
			}
		}
	}
	if out, err := exec.Command("git", "-C", repoRoot(), "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	return m
}

func fmtStat(s stat, unit string) string {
	if s.med == 0 && s.hi == 0 {
		return "—"
	}
	return fmt.Sprintf("%.0f%s (%.0f–%.0f)", s.med, unit, s.lo, s.hi)
}

func fmtRatio(p *float64) string {
	if p == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", *p)
}

func verdictMark(p *float64, target float64) string {
	if p == nil {
		return "not measured"
	}
	if *p >= target {
		return "met"
	}
	return "**not met**"
}

// rawResults is everything a report is made from, saved beside it so the report can be
// re-rendered (-render) without measuring again.
type rawResults struct {
	Command   string                 `json:"command"`
	Machine   machineInfo            `json:"machine"`
	Runs      int                    `json:"runs"`
	Duration  time.Duration          `json:"duration_ns"`
	Clients   []int                  `json:"clients"`
	Policies  []int                  `json:"policies"`
	Base      int                    `json:"base_policies"`
	Benchtime time.Duration          `json:"benchtime_ns"`
	Summary   *summary               `json:"summary"`
	Results   []*result              `json:"results"`
	AgentHist map[string]histSummary `json:"agent_histograms"`
	Micro     []microResult          `json:"micro"`
	Profiles  map[string]string      `json:"profiles"`
	Notes     []string               `json:"notes"`
}

func rerender(out string) error {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(out), "results.json"))
	if err != nil {
		return fmt.Errorf("read the raw results of a full run: %w", err)
	}
	var r rawResults
	if err := json.Unmarshal(b, &r); err != nil {
		return err
	}
	h := &harness{o: options{out: out, runs: r.Runs, duration: r.Duration, clients: r.Clients, policies: r.Policies,
		base: r.Base, benchtime: r.Benchtime}, machine: r.Machine, results: r.Results, agentHist: r.AgentHist,
		microRes: r.Micro, profiles: r.Profiles, notes: r.Notes, command: r.Command, log: os.Stderr}
	return h.writeReport(r.Summary)
}

func (h *harness) writeReport(s *summary) error {
	dir := filepath.Dir(h.o.out)
	var b strings.Builder
	m := h.machine
	cmdline := h.command
	raw, err := json.MarshalIndent(rawResults{Command: cmdline, Machine: m, Runs: h.o.runs, Duration: h.o.duration,
		Clients: h.o.clients, Policies: h.o.policies, Base: h.o.base, Benchtime: h.o.benchtime, Summary: s,
		Results: h.results, AgentHist: h.agentHist, Micro: h.microRes, Profiles: h.profiles, Notes: h.notes}, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), raw, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(&b, "# sluice benchmark results\n\n")
	fmt.Fprintf(&b, "Generated by `make bench` (`%s`) on %s, commit %s. Rewritten by every full run; do not edit by hand (the analysis comes from `bench/ANALYSIS.md`).\n\n",
		strings.TrimSpace(cmdline), m.Started.Format("2006-01-02 15:04 UTC"), m.Commit)
	fmt.Fprintf(&b, "**Machine:** %d CPUs (`nproc`), %s, kernel %s, %s. Every process (load generator, server, queue reader or agent, the kernel's forwarding) shares these CPUs.\n\n", m.CPUs, m.CPU, m.Kernel, m.Go)
	fmt.Fprintf(&b, "**Method:** a netlab lab (a node namespace routing between %d client pods and a server pod over veths). Each measurement runs once per round, %d rounds of %s, rounds interleaving all configurations; tables show the median and (min–max). New TCP connections: N client threads spread over min(N, %d) client pods connect and close with RST (SO_LINGER 0); conntrack is flushed before each run. Latency is connect() time (SYN to SYN-ACK) measured by the client. *Reader CPU* is the user+system CPU of the queue reader (bare loop or agent) per connection or datagram, from /proc. Whole run: %.0f s.\n\n",
		clientPods, h.o.runs, h.o.duration, clientPods, s.ElapsedS)

	c := s.Clients
	fmt.Fprintf(&b, "## Targets (new TCP connections/s at %d clients, %d policies)\n\n", c, h.o.base)
	fmt.Fprintf(&b, "| target | measured | |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| sluice ≥ 0.95 × bare NFQUEUE loop | %s | %s |\n", fmtRatio(s.SluiceVsBare), verdictMark(s.SluiceVsBare, 0.95))
	fmt.Fprintf(&b, "| sluice ≥ 0.85 × no filter | %s | %s |\n", fmtRatio(s.SluiceVsNoFilter), verdictMark(s.SluiceVsNoFilter, 0.85))
	fmt.Fprintf(&b, "| sluice --offload ≥ 0.95 × bare NFQUEUE loop | %s | %s |\n", fmtRatio(s.OffloadVsBare), verdictMark(s.OffloadVsBare, 0.95))
	fmt.Fprintf(&b, "| sluice --offload ≥ 0.85 × no filter | %s | %s |\n", fmtRatio(s.OffloadVsNoFilter), verdictMark(s.OffloadVsNoFilter, 0.85))
	if s.AgentDecisionP99us != nil {
		v := *s.AgentDecisionP99us
		mark := "met"
		if v > 15 {
			mark = "**not met**"
		}
		fmt.Fprintf(&b, "| per-packet user-space p99 ≤ 15 µs (new TCP connections, agent competing with the clients for the CPUs) | %.1f µs | %s |\n", v, mark)
		if hs, ok := h.agentHist[sluiceCfg("sluice queue-all 1q", 1, "queue-all", false, h.o.base).label()]; ok && hs.Count > 0 {
			mark := "met"
			if hs.P99us > 15 {
				mark = "**not met**"
			}
			fmt.Fprintf(&b, "| per-packet user-space p99 ≤ 15 µs (UDP queue-all, senders at lower priority) | %.1f µs | %s |\n", hs.P99us, mark)
		}
	} else {
		fmt.Fprintf(&b, "| per-packet user-space p99 ≤ 15 µs | n/a | not measured (no histogram scraped) |\n")
	}
	q1 := h.find("sluice queue-all 1q", "udp", 8, 0)
	q2 := h.find("sluice queue-all 2q", "udp", 8, 0)
	r := ratio(q2, q1)
	fmt.Fprintf(&b, "| UDP queue-all: 2 queues ≥ 1.7 × 1 queue | %s | %s |\n", fmtRatio(r), verdictMark(r, 1.7))
	h.cTargets(&b)
	b.WriteString("\n")
	h.readersTable(&b)

	var per, cpu []string
	for _, c := range h.o.clients {
		sl, bare := h.find("sluice", "tcp", c, h.o.base), h.find("bare-nfqueue", "tcp", c, 0)
		per = append(per, fmt.Sprintf("%d: %s", c, fmtRatio(ratio(sl, bare))))
		if sl != nil && bare != nil {
			x := sl.stat(func(r runResult) float64 { return r.ReaderCPU }).med / bare.stat(func(r runResult) float64 { return r.ReaderCPU }).med
			cpu = append(cpu, fmt.Sprintf("%d: %.2f", c, x))
		}
	}
	fmt.Fprintf(&b, "sluice ÷ bare NFQUEUE loop at each client count (conn/s): %s. Reader CPU per connection, sluice ÷ bare loop: %s.\n\n",
		strings.Join(per, ", "), strings.Join(cpu, ", "))
	fmt.Fprintf(&b, "## New TCP connections per second vs concurrent clients (%d policies)\n\n", h.o.base)
	fmt.Fprintf(&b, "![rate vs clients](rate_vs_clients.png)\n\n")
	fmt.Fprintf(&b, "| configuration | clients | conn/s median (min–max) | vs no filter | connect p50 µs | connect p99 µs | reader CPU µs/conn | machine busy | errors |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, res := range h.results {
		if res.Mode != "tcp" || (res.Cfg.Policies != 0 && res.Cfg.Policies != h.o.base) {
			continue
		}
		h.row(&b, res)
	}
	fmt.Fprintf(&b, "\n## UDP datagrams per second through the queue (queue-all: every datagram is queued; 8 senders over %d client pods, at low CPU priority)\n\n", min(8, clientPods))
	fmt.Fprintf(&b, "| configuration | received dgram/s median (min–max) | sent dgram/s | reader CPU µs/dgram | machine busy |\n|---|---|---|---|---|\n")
	for _, res := range h.results {
		if res.Mode != "udp" {
			continue
		}
		if res.Failed != "" && len(res.Runs) == 0 {
			fmt.Fprintf(&b, "| %s | failed: %s | | | |\n", res.Cfg.label(), oneLine(res.Failed))
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.2f | %.0f%% |\n", res.Cfg.label(), fmtStat(res.stat(rate), ""),
			res.stat(func(r runResult) float64 { return r.Sent }).med, res.stat(func(r runResult) float64 { return r.ReaderCPU }).med,
			100*res.stat(func(r runResult) float64 { return r.Busy }).med)
	}
	mid := h.headlineClients()
	fmt.Fprintf(&b, "\n## Scaling with the number of policies (%d clients)\n\n", mid)
	fmt.Fprintf(&b, "![latency vs policies](latency_vs_policies.png)\n\n")
	fmt.Fprintf(&b, "| configuration | policies | conn/s median (min–max) | connect p50 µs | connect p99 µs | reader CPU µs/conn |\n|---|---|---|---|---|---|\n")
	for _, name := range []string{"iptables-policies", "sluice", "sluice+offload"} {
		for _, n := range h.o.policies {
			res := h.find(name, "tcp", mid, n)
			if res == nil {
				continue
			}
			fmt.Fprintf(&b, "| %s | %d | %s | %.0f | %.0f | %.1f |\n", name, n, fmtStat(res.stat(rate), ""),
				res.stat(func(r runResult) float64 { return r.P50us }).med, res.stat(func(r runResult) float64 { return r.P99us }).med,
				res.stat(func(r runResult) float64 { return r.ReaderCPU }).med)
		}
	}
	fmt.Fprintf(&b, "\n`iptables-policies` writes the same NetworkPolicies as plain iptables rules: a linear dispatch on the destination address into one chain per isolated pod (the server's jump sits in the middle of the list), ESTABLISHED accepted first.\n")

	fmt.Fprintf(&b, "\n## Agent's own per-packet decision time (its histogram, scraped from /metrics)\n\n")
	if len(h.agentHist) == 0 {
		fmt.Fprintf(&b, "Not available in this run (no agent, or no `sluice_*` histogram in its metrics).\n")
	} else {
		fmt.Fprintf(&b, "| configuration | metric | samples | mean µs | p50 µs | p99 µs |\n|---|---|---|---|---|---|\n")
		var keys []string
		for k := range h.agentHist {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			hs := h.agentHist[k]
			fmt.Fprintf(&b, "| %s | `%s` | %d | %.1f | %.1f | %.1f |\n", k, hs.Metric, hs.Count, hs.MeanUs, hs.P50us, hs.P99us)
		}
		fmt.Fprintf(&b, "\nQuantiles are interpolated inside histogram buckets, as Prometheus's `histogram_quantile` does.\n")
	}
	if len(h.microRes) > 0 {
		fmt.Fprintf(&b, "\n## Micro benchmarks (in-process, `testing.Benchmark`, clustergen cluster, benchtime %s)\n\n", h.o.benchtime)
		fmt.Fprintf(&b, "| benchmark | ns/op | allocs/op | B/op | iterations |\n|---|---|---|---|---|\n")
		for _, r := range h.microRes {
			fmt.Fprintf(&b, "| %s | %.1f | %d | %d | %d |\n", r.Name, r.NsPerOp, r.AllocsOp, r.BytesOp, r.N)
		}
	}
	if len(h.profiles) > 0 {
		for _, k := range sortedKeys(h.profiles) {
			fmt.Fprintf(&b, "\n## CPU profile: %s\n\n```\n%s```\n", k, h.profiles[k])
		}
	}
	if an, err := os.ReadFile(filepath.Join(dir, "ANALYSIS.md")); err == nil {
		fmt.Fprintf(&b, "\n%s\n", strings.TrimSpace(string(an)))
	}
	if len(h.notes) > 0 {
		fmt.Fprintf(&b, "\n## Notes from this run\n\n")
		for _, n := range h.notes {
			fmt.Fprintf(&b, "- %s\n", oneLine(n))
		}
	}
	if err := h.plots(dir); err != nil {
		h.note("plots: %v", err)
	}
	return os.WriteFile(h.o.out, []byte(b.String()), 0o644)
}

func trimProfile(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "File:") || strings.HasPrefix(l, "Build ID:") || strings.HasPrefix(l, "Time:") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " | ")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

func (h *harness) row(b *strings.Builder, res *result) {
	if len(res.Runs) == 0 {
		fmt.Fprintf(b, "| %s | %d | failed: %s | | | | | | |\n", res.Cfg.label(), res.Clients, oneLine(res.Failed))
		return
	}
	vs := "—"
	if nf := h.find("no-filter", "tcp", res.Clients, 0); nf != nil {
		vs = fmtRatio(ratio(res, nf))
	}
	var errs uint64
	for _, r := range res.Runs {
		errs += r.Errors
	}
	fmt.Fprintf(b, "| %s | %d | %s | %s | %.0f | %.0f | %.1f | %.0f%% | %d |\n", res.Cfg.label(), res.Clients, fmtStat(res.stat(rate), ""), vs,
		res.stat(func(r runResult) float64 { return r.P50us }).med, res.stat(func(r runResult) float64 { return r.P99us }).med,
		res.stat(func(r runResult) float64 { return r.ReaderCPU }).med, 100*res.stat(func(r runResult) float64 { return r.Busy }).med, errs)
}

func (h *harness) plots(dir string) error {
	// Rate vs clients, one line per configuration.
	p := plot.New()
	p.Title.Text = fmt.Sprintf("New TCP connections/s vs clients (%d policies, median of %d)", h.o.base, h.o.runs)
	p.X.Label.Text = "concurrent clients"
	p.Y.Label.Text = "connections/s"
	p.Legend.Top = true
	p.Legend.Left = true
	var lines []any
	seen := map[string]bool{}
	for _, res := range h.results {
		name := res.Cfg.Name
		if res.Mode != "tcp" || seen[name] || (res.Cfg.Policies != 0 && res.Cfg.Policies != h.o.base) {
			continue
		}
		var xys plotter.XYs
		for _, c := range h.o.clients {
			if r := h.find(name, "tcp", c, res.Cfg.Policies); r != nil {
				xys = append(xys, plotter.XY{X: float64(c), Y: r.stat(rate).med})
			}
		}
		if len(xys) < 2 {
			continue
		}
		seen[name] = true
		lines = append(lines, name, xys)
	}
	if len(lines) > 0 {
		if err := plotutil.AddLinePoints(p, lines...); err != nil {
			return err
		}
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = clientTicks(h.o.clients)
		p.Y.Min = 0
		p.Y.Tick.Marker = intTicks{}
		p.Add(plotter.NewGrid())
		if err := p.Save(8*vg.Inch, 5*vg.Inch, filepath.Join(dir, "rate_vs_clients.png")); err != nil {
			return err
		}
	}

	// Connection setup latency vs policy count.
	p = plot.New()
	p.Title.Text = fmt.Sprintf("Connection setup latency vs policies (%d clients)", h.headlineClients())
	p.X.Label.Text = "NetworkPolicies"
	p.Y.Label.Text = "connect() µs"
	// p99 lines run along the top and p50 lines along the bottom: the legend goes between.
	p.Legend.Top = false
	p.Legend.Left = false
	p.Legend.YOffs = 1.3 * vg.Inch
	lines = nil
	for _, name := range []string{"iptables-policies", "sluice", "sluice+offload"} {
		var p50, p99 plotter.XYs
		for _, n := range h.o.policies {
			if r := h.find(name, "tcp", h.headlineClients(), n); r != nil {
				p50 = append(p50, plotter.XY{X: float64(n), Y: r.stat(func(r runResult) float64 { return r.P50us }).med})
				p99 = append(p99, plotter.XY{X: float64(n), Y: r.stat(func(r runResult) float64 { return r.P99us }).med})
			}
		}
		if len(p50) >= 2 {
			lines = append(lines, name+" p50", p50, name+" p99", p99)
		}
	}
	if len(lines) > 0 {
		if err := plotutil.AddLinePoints(p, lines...); err != nil {
			return err
		}
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		// p50 is tens of µs while p99 reaches tens of ms on a saturated machine.
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		p.Add(plotter.NewGrid())
		if err := p.Save(8*vg.Inch, 5*vg.Inch, filepath.Join(dir, "latency_vs_policies.png")); err != nil {
			return err
		}
	}
	return nil
}

type clientTicks []int

func (c clientTicks) Ticks(min, max float64) []plot.Tick {
	var t []plot.Tick
	for _, v := range c {
		t = append(t, plot.Tick{Value: float64(v), Label: fmt.Sprint(v)})
	}
	return t
}

func sortedKeys[V any](m map[string]V) []string {
	var k []string
	for x := range m {
		k = append(k, x)
	}
	sort.Strings(k)
	return k
}

// intTicks are the default ticks labelled without decimals (rates are whole numbers).
type intTicks struct{}

func (intTicks) Ticks(min, max float64) []plot.Tick {
	t := plot.DefaultTicks{}.Ticks(min, max)
	for i := range t {
		if t[i].Label != "" {
			t[i].Label = fmt.Sprintf("%.0f", t[i].Value)
		}
	}
	return t
}

func (r *result) med(f func(runResult) float64) float64 { return r.stat(f).med }

func readerCPU(r runResult) float64 { return r.ReaderCPU }
func p50(r runResult) float64       { return r.P50us }

// quotient is a/b rounded like ratio, nil when either side is missing.
func quotient(a, b float64) *float64 {
	if a == 0 || b == 0 {
		return nil
	}
	v := math.Round(a/b*1000) / 1000
	return &v
}

func upTo(p *float64, limit float64) string {
	if p == nil {
		return "not measured"
	}
	if *p <= limit {
		return "met"
	}
	return "**not met**"
}

// cTargets are issue 15's targets: sluice against the C loop over libnetfilter_queue, the
// machine's NFQUEUE floor, measured in the same run.
func (h *harness) cTargets(b *strings.Builder) {
	for _, c := range h.o.clients {
		sl, cl := h.find("sluice", "tcp", c, h.o.base), h.find("c-nfqueue", "tcp", c, 0)
		r := ratio(sl, cl)
		fmt.Fprintf(b, "| sluice ≥ 0.90 × C loop (c-nfqueue), %d clients | %s | %s |\n", c, fmtRatio(r), verdictMark(r, 0.90))
		var q *float64
		if sl != nil && cl != nil {
			q = quotient(sl.med(readerCPU), cl.med(readerCPU))
		}
		fmt.Fprintf(b, "| sluice reader CPU per connection ≤ 1.15 × C loop's, %d clients | %s | %s |\n", c, fmtRatio(q), upTo(q, 1.15))
	}
	sl, cl := h.find("sluice", "tcp", 1, h.o.base), h.find("c-nfqueue", "tcp", 1, 0)
	if sl != nil && cl != nil {
		q := quotient(sl.med(p50), cl.med(p50))
		fmt.Fprintf(b, "| sluice connect p50 at 1 client ≤ 1.10 × C loop's | %.0f µs vs %.0f µs: %s | %s |\n", sl.med(p50), cl.med(p50), fmtRatio(q), upTo(q, 1.10))
	}
	su, cu := h.find("sluice queue-all 1q", "udp", 8, 0), h.find("c-nfqueue queue-all 1q", "udp", 8, 0)
	r := ratio(su, cu)
	fmt.Fprintf(b, "| UDP queue-all, 1 queue: sluice ≥ 0.90 × C loop | %s | %s |\n", fmtRatio(r), verdictMark(r, 0.90))
}

// readersTable sets every queue reader beside the C loop at each client count: the rate and
// the reader's CPU per connection, as fractions of the C loop's.
func (h *harness) readersTable(b *strings.Builder) {
	readers := []struct {
		name string
		pol  int
	}{{"bare-nfqueue", 0}, {"bare-nfq", 0}, {"sluice", h.o.base}}
	var head, sep strings.Builder
	for _, c := range h.o.clients {
		fmt.Fprintf(&head, " conn/s ÷ C, %d cl. | CPU/conn ÷ C, %d cl. |", c, c)
		sep.WriteString("---|---|")
	}
	fmt.Fprintf(b, "### Queue readers against the C loop (c-nfqueue: libnetfilter_queue, one blocking receive and one verdict per packet)\n\n")
	fmt.Fprintf(b, "| reader |%s\n|---|%s\n", head.String(), sep.String())
	for _, rd := range readers {
		fmt.Fprintf(b, "| %s |", rd.name)
		for _, c := range h.o.clients {
			r, cl := h.find(rd.name, "tcp", c, rd.pol), h.find("c-nfqueue", "tcp", c, 0)
			var q *float64
			if r != nil && cl != nil {
				q = quotient(r.med(readerCPU), cl.med(readerCPU))
			}
			fmt.Fprintf(b, " %s | %s |", fmtRatio(ratio(r, cl)), fmtRatio(q))
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(b, "\n`bare-nfqueue` is an accept-all loop over github.com/florianl/go-nfqueue, `bare-nfq` the same loop over sluice's own reader (filter/nfq), `sluice` the agent.\n\n")
}
