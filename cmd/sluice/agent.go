package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/policy"
	"github.com/sluice-dev/sluice/watch"
)

func init() { extraCommands = append(extraCommands, newAgentCmd) }

type agentOpts struct {
	state, kubeconfig, node string
	queueNum                uint16
	queues                  int
	mode                    string
	failOpen, audit         bool
	judgeNode               bool
	cacheSize               int
	metricsAddr             string
	logFormat               string
	verbosity               int
	cut                     bool
	offload                 bool
	offloadTimeout          time.Duration
	cleanup                 bool
	firstSnapshot           time.Duration
}

func newAgentCmd() *cobra.Command {
	o := &agentOpts{}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Enforce NetworkPolicy on this node through NFQUEUE",
		Long: `sluice agent installs its own iptables chains (SLUICE-*), which queue the packets of new
connections that involve a local pod to NFQUEUE; it judges each one against the compiled
policies and accepts or drops it, logging every drop with the reason.

Policies come from --state FILE (re-read on change; every pod in it is local unless --node is
given) or, without --state, from the API server (--kubeconfig, else in-cluster config; --node
defaults to $NODE_NAME).

Failure behaviour: --fail-open (default) adds --queue-bypass to the rules and the FAIL_OPEN flag
to the queue, so traffic flows when the agent is gone or the queue is full; --fail-open=false
drops instead. An agent that is alive but stuck black-holes queued packets either way, so a
watchdog fails /healthz after 2 s without progress and exits the agent after 10 s.

Established connections survive a policy change unless --cut-established, which deletes the
conntrack entries of connections the new policy denies.

On SIGTERM or SIGINT every rule and set the agent installed is removed. --cleanup removes what a
crashed agent left and exits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runAgent(cmd.Context(), cmd.ErrOrStderr(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.state, "state", "", "state file (YAML: pods, namespaces, networkpolicies); without it, watch the API server")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for the API server (default: in-cluster config)")
	f.StringVar(&o.node, "node", "", "this node's name: pods with this spec.nodeName are local (default: every pod with --state, $NODE_NAME otherwise)")
	f.Uint16Var(&o.queueNum, "queue-num", 100, "first NFQUEUE number")
	f.IntVar(&o.queues, "queues", 1, "number of queues (and worker goroutines), spread by flow hash")
	f.StringVar(&o.mode, "mode", "new-only", "new-only: queue the first packet of each connection and trust conntrack for the rest; queue-all: queue every packet of local pods' flows and track return traffic in sluice")
	f.BoolVar(&o.failOpen, "fail-open", true, "accept traffic when the agent is gone or its queue is full (false: drop it)")
	f.BoolVar(&o.audit, "audit", false, "judge and log what would be dropped, but accept everything")
	f.BoolVar(&o.judgeNode, "judge-node", false, "judge the node's own connections to local pods too (default: accept them, as kubelet probes need)")
	f.IntVar(&o.cacheSize, "cache-size", filter.DefaultCacheSize, "flows remembered per queue worker")
	f.StringVar(&o.metricsAddr, "metrics-addr", filter.DefaultMetricsAddr, "address of /metrics, /healthz and /readyz (empty: none)")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	f.IntVarP(&o.verbosity, "verbosity", "v", 0, "log verbosity: 0 drops and events, 1 also accepted connections, -1 warnings only")
	f.BoolVar(&o.cut, "cut-established", false, "on a policy change, cut established connections the new policy denies (deletes their conntrack entries)")
	f.BoolVar(&o.offload, "offload", false, "mirror verdicts into ipsets so repeat connections between the same endpoints are decided in the kernel")
	f.DurationVar(&o.offloadTimeout, "offload-timeout", 5*time.Minute, "lifetime of an offloaded verdict")
	f.BoolVar(&o.cleanup, "cleanup", false, "remove every sluice rule and set in this network namespace, then exit")
	f.DurationVar(&o.firstSnapshot, "first-snapshot-timeout", 0, "give up when no policy snapshot arrives within this time (0: wait forever; traffic is not filtered meanwhile)")
	return cmd
}

func newLogger(w io.Writer, format string, verbosity int) (*slog.Logger, error) {
	level := slog.LevelInfo
	switch {
	case verbosity >= 1:
		level = slog.LevelDebug
	case verbosity < 0:
		level = slog.LevelWarn
	}
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: use text or json", format)
}

func runAgent(ctx context.Context, stderr io.Writer, o *agentOpts) error {
	log, err := newLogger(stderr, o.logFormat, o.verbosity)
	if err != nil {
		return err
	}
	if o.cleanup {
		return filter.CleanupRules(log)
	}
	var queueAll bool
	switch o.mode {
	case "new-only":
	case "queue-all":
		queueAll = true
	default:
		return fmt.Errorf("--mode %q: use new-only or queue-all", o.mode)
	}
	if o.queues < 1 || int(o.queueNum)+o.queues > 65536 {
		return fmt.Errorf("--queues %d from --queue-num %d: need 1 or more queues numbered below 65536", o.queues, o.queueNum)
	}

	node := o.node
	var source watch.Source
	if o.state != "" {
		source = watch.NewFileSource(o.state, policy.Options{Node: node}, log)
	} else {
		if node == "" {
			node = os.Getenv("NODE_NAME")
		}
		if node == "" {
			return errors.New("no --state and no node name: in cluster mode pass --node or set NODE_NAME (the downward API's spec.nodeName)")
		}
		cfg, err := restConfig(o.kubeconfig)
		if err != nil {
			return err
		}
		source = watch.NewAPISource(cfg, policy.Options{Node: node}, log, 0)
	}

	metrics := filter.NewMetrics()
	if err := watch.RegisterMetrics(metrics.Registry); err != nil {
		return fmt.Errorf("registering watch metrics: %w", err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The queue readers get their own context: they must outlive the rules on shutdown, so
	// that no packet is queued to a queue nobody reads (a drop when fail-closed).
	qctx, qcancel := context.WithCancel(context.Background())
	defer qcancel()

	var off *filter.Offload
	var rec filter.FlowRecorder
	if o.offload {
		off, err = filter.NewOffload("sluice", o.offloadTimeout, log)
		if err != nil {
			return err
		}
		rec = off
		if queueAll {
			log.Warn("--offload with --mode queue-all: offloaded flows skip sluice's return table; replies are still judged")
		}
	}
	dp := filter.New(filter.Config{
		QueueNum: o.queueNum, Queues: o.queues, QueueAll: queueAll, FailOpen: o.failOpen,
		Audit: o.audit, CutEstablished: o.cut, CacheSize: o.cacheSize, Log: log,
		Metrics: metrics, Offload: rec, FaultStallPort: faultStallPort(log),
	})

	a := &agent{log: log, dp: dp}
	if o.metricsAddr != "" {
		go func() {
			if err := metrics.Serve(ctx, o.metricsAddr, dp.Health, a.ready); err != nil {
				log.Error("metrics server stopped", "err", err)
			}
		}()
	}

	// Queues first, rules second: a rule that queues to an unbound queue drops (fail-closed)
	// or bypasses sluice (fail-open).
	qdone, err := dp.Run(qctx)
	if err != nil {
		closeOffload(off, log)
		return err
	}
	stopQueues := func() {
		qcancel()
		<-qdone
	}

	first := make(chan struct{})
	var firstOnce sync.Once
	srcErr := make(chan error, 1)
	go func() {
		srcErr <- source.Run(ctx, func(s *policy.Snapshot) {
			dp.Publish(s)
			a.updateLocalPods(s)
			firstOnce.Do(func() { close(first) })
		})
	}()

	var timeout <-chan time.Time
	if o.firstSnapshot > 0 {
		timeout = time.After(o.firstSnapshot)
	}
	select {
	case <-first:
	case err := <-srcErr:
		stopQueues()
		closeOffload(off, log)
		if err == nil {
			err = ctx.Err()
		}
		return fmt.Errorf("policy source ended before the first snapshot: %w", err)
	case <-timeout:
		cancel()
		stopQueues()
		closeOffload(off, log)
		return fmt.Errorf("no policy snapshot within %s (--first-snapshot-timeout)", o.firstSnapshot)
	case <-ctx.Done():
		stopQueues()
		closeOffload(off, log)
		return nil
	}

	var sets *filter.OffloadSets
	if off != nil {
		sets = off.Sets()
	}
	if err := a.install(filter.RuleConfig{
		QueueNum: o.queueNum, Queues: o.queues, FailOpen: o.failOpen, QueueAll: queueAll,
		JudgeNode: o.judgeNode, OffloadSets: sets, Log: log,
	}); err != nil {
		cancel()
		stopQueues()
		closeOffload(off, log)
		return err
	}
	log.Info("sluice agent running", "node", nodeLabel(node), "mode", o.mode, "fail_open", o.failOpen,
		"audit", o.audit, "cut_established", o.cut, "queues", o.queues, "metrics", o.metricsAddr)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("stopping: removing kernel rules")
	case err := <-srcErr:
		runErr = fmt.Errorf("policy source stopped: %w", err)
		log.Error("policy source stopped; removing kernel rules", "err", err)
	}
	cancel()
	if err := a.remove(); err != nil {
		runErr = errors.Join(runErr, err)
	}
	closeOffload(off, log)
	stopQueues()
	log.Info("sluice agent stopped")
	return runErr
}

// faultStallPort reads SLUICE_FAULT_STALL_PORT, the watchdog's fault injection used by the
// end-to-end tests: a queue worker that sees a packet to that port hangs for good.
func faultStallPort(log *slog.Logger) uint16 {
	v := os.Getenv("SLUICE_FAULT_STALL_PORT")
	if v == "" {
		return 0
	}
	p, err := strconv.ParseUint(v, 10, 16)
	if err != nil {
		log.Warn("ignoring SLUICE_FAULT_STALL_PORT: not a port number", "value", v)
		return 0
	}
	log.Warn("fault injection armed: a packet to this port hangs its queue worker", "port", p)
	return uint16(p)
}

func nodeLabel(n string) string {
	if n == "" {
		return "(every pod is local)"
	}
	return n
}

func closeOffload(off *filter.Offload, log *slog.Logger) {
	if off == nil {
		return
	}
	if err := off.Close(); err != nil {
		log.Error("removing offload sets failed; run sluice agent --cleanup", "err", err)
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		kubeconfig = os.Getenv("KUBECONFIG")
	}
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no --state, no --kubeconfig and not in a cluster (%w): pass --state FILE or --kubeconfig", err)
	}
	return cfg, nil
}

// agent ties the rules to the snapshots: the local pod sets follow every snapshot.
type agent struct {
	log *slog.Logger
	dp  *filter.Dataplane

	mu    sync.Mutex
	rules *filter.Rules
	local []netip.Addr // sorted, as last written to the kernel
	// pending is the local pod list of a snapshot published before the rules existed.
	pending []netip.Addr
}

func (a *agent) install(cfg filter.RuleConfig) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	cfg.LocalPods = a.pending
	r, err := filter.InstallRules(cfg)
	if err != nil {
		return err
	}
	a.rules, a.local = r, a.pending
	return nil
}

func (a *agent) updateLocalPods(s *policy.Snapshot) {
	ips := s.LocalPodIPs()
	slices.SortFunc(ips, func(x, y netip.Addr) int { return x.Compare(y) })
	ips = slices.Compact(ips)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.rules == nil {
		a.pending = ips
		return
	}
	if slices.Equal(ips, a.local) {
		return
	}
	if err := a.rules.UpdateLocalPods(ips); err != nil {
		a.log.Error("updating the local pod sets failed; the previous set stays in force", "err", err)
		return
	}
	a.local = ips
	a.log.Info("local pods changed", "addresses", len(ips))
}

func (a *agent) remove() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.rules == nil {
		return nil
	}
	err := a.rules.Remove()
	a.rules = nil
	if err != nil {
		return fmt.Errorf("removing kernel rules: %w (run sluice agent --cleanup)", err)
	}
	return nil
}

func (a *agent) ready() error {
	a.mu.Lock()
	installed := a.rules != nil
	a.mu.Unlock()
	if !installed {
		return errors.New("kernel rules not installed yet")
	}
	return a.dp.Ready()
}
