package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-dev/sluice/filter"
	"github.com/sluice-dev/sluice/filter/conntrack"
	"github.com/sluice-dev/sluice/filter/offload"
	"github.com/sluice-dev/sluice/filter/queue"
	"github.com/sluice-dev/sluice/filter/rules"
	"github.com/sluice-dev/sluice/policy"
	"github.com/sluice-dev/sluice/watch"
)

// DefaultMetricsAddr keeps metrics on loopback: the agent runs in the host network namespace
// and its counters name pods and policies.
const DefaultMetricsAddr = "127.0.0.1:9963"

type agentOptions struct {
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
	podInterfaces           []string
	admissionRate           int
	admissionBurst          int
	mark                    uint32
	resync                  time.Duration
	lockFile                string
	setBridgeNF             bool
	stateStore              string
}

func newAgentCmd() *cobra.Command {
	o := &agentOptions{}
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
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd.Context(), cmd.ErrOrStderr()) },
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
	f.StringVar(&o.metricsAddr, "metrics-addr", DefaultMetricsAddr, "address of /metrics, /healthz and /readyz (empty: none)")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	f.IntVarP(&o.verbosity, "verbosity", "v", 0, "log verbosity: 0 drops and events, 1 also accepted connections, -1 warnings only")
	f.BoolVar(&o.cut, "cut-established", false, "on a policy change, cut established connections the new policy denies (deletes their conntrack entries)")
	f.BoolVar(&o.offload, "offload", false, "mirror verdicts into ipsets so repeat connections between the same endpoints are decided in the kernel")
	f.DurationVar(&o.offloadTimeout, "offload-timeout", 5*time.Minute, "lifetime of an offloaded verdict")
	f.BoolVar(&o.cleanup, "cleanup", false, "remove every sluice rule and set in this network namespace, then exit")
	f.DurationVar(&o.firstSnapshot, "first-snapshot-timeout", 0, "give up when no policy snapshot arrives within this time (0: wait forever; traffic is not filtered meanwhile)")
	f.StringSliceVar(&o.podInterfaces, "pod-interfaces", rules.DefaultPodInterfaces, "iptables patterns of the node side of pod interfaces: packets from them with a source the pod does not own are dropped (empty: no anti-spoofing)")
	f.IntVar(&o.admissionRate, "admission-rate", 2000, "packets per second one source address may put into the queue; the excess is dropped in the kernel so no pod can fill the queue (0: no limit)")
	f.IntVar(&o.admissionBurst, "admission-burst", 1000, "burst allowed above --admission-rate (keep it well below the queue length, 4096)")
	f.Uint32Var(&o.mark, "mark-bit", rules.DefaultMark, "packet mark bit sluice sets on accepted packets so the rest of the chain applies to them; must be unused by other components")
	f.DurationVar(&o.resync, "resync-interval", 10*time.Second, "how often the agent checks its kernel rules and repairs them")
	f.StringVar(&o.lockFile, "lock-file", rules.DefaultLockFile, "lock file that serialises the rule changes of the agents of one node (on a path they share)")
	f.StringVar(&o.stateStore, "state-store", watch.DefaultStateStore, "cluster mode: node-local file holding the last policy state the agent knew; a starting agent enforces it until the API server's first complete list (empty: none)")
	f.BoolVar(&o.setBridgeNF, "set-bridge-nf-call", false, "when pod interfaces are bridged, turn net.bridge.bridge-nf-call-iptables/ip6tables on instead of refusing readiness")
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

func (o *agentOptions) run(ctx context.Context, stderr io.Writer) error {
	log, err := newLogger(stderr, o.logFormat, o.verbosity)
	if err != nil {
		return err
	}
	if o.cleanup {
		return rules.Cleanup(log, o.lockFile)
	}
	a, err := o.newAgent(log)
	if err != nil {
		return err
	}
	return a.run(ctx)
}

// agent is one running agent: the packet path, the queues that feed it, the kernel rules that
// feed the queues, and the policy source. Everything it sets up is pushed on one cleanup stack
// and undone in reverse order, whatever way the agent ends.
type agent struct {
	o         *agentOptions
	log       *slog.Logger
	node      string
	queueAll  bool
	spec      queue.Spec
	source    watch.Source
	reg       *prometheus.Registry
	engine    *filter.Engine
	queues    *queue.Queues
	offload   *offload.Offload
	cutter    *conntrack.Cutter
	undo      cleanups
	podIfaces []string
	integrity *integrity
	// persisted is the last known snapshot read from --state-store, enforced until the API
	// source publishes its first.
	persisted *policy.Snapshot

	// staleOffload: a flush of the offload sets failed, so verdicts of an older snapshot may be
	// in the kernel; the integrity loop retries.
	staleOffload atomic.Bool

	mu    sync.Mutex
	rules *rules.Rules
	local []netip.Addr // sorted, as last written to the kernel
	// pending is the local pod list of a snapshot published before the rules existed.
	pending []netip.Addr
}

// newAgent checks the options and builds the agent; nothing touches the kernel yet.
func (o *agentOptions) newAgent(log *slog.Logger) (*agent, error) {
	a := &agent{o: o, log: log, node: o.node, reg: prometheus.NewRegistry()}
	switch o.mode {
	case "new-only":
	case "queue-all":
		a.queueAll = true
	default:
		return nil, fmt.Errorf("--mode %q: use new-only or queue-all", o.mode)
	}
	a.spec = queue.Spec{First: o.queueNum, Count: o.queues, FailOpen: o.failOpen}
	if err := a.spec.Validate(); err != nil {
		return nil, fmt.Errorf("--queue-num %d, --queues %d: %w", o.queueNum, o.queues, err)
	}
	if o.offload && a.queueAll {
		// Offloaded flows skip the queue, so their replies would never find the connection
		// in sluice's own table, which is all queue-all mode has.
		return nil, errors.New("--offload decides repeat flows in the kernel, so in --mode queue-all their replies would be dropped: use --offload with --mode new-only")
	}
	if o.mark == 0 || o.mark&(o.mark-1) != 0 {
		return nil, fmt.Errorf("--mark-bit 0x%x: give one bit, e.g. 0x%x", o.mark, rules.DefaultMark)
	}
	if o.admissionRate < 0 || o.admissionBurst < 0 {
		return nil, errors.New("--admission-rate and --admission-burst cannot be negative")
	}
	if o.resync <= 0 {
		return nil, fmt.Errorf("--resync-interval %s: give a positive duration", o.resync)
	}
	// An empty --pod-interfaces= arrives as one empty pattern.
	a.podIfaces = slices.DeleteFunc(slices.Clone(o.podInterfaces), func(p string) bool { return p == "" })
	if o.state != "" {
		a.source = watch.NewFileSource(o.state, policy.Options{Node: a.node}, log)
	} else {
		if a.node == "" {
			a.node = os.Getenv("NODE_NAME")
		}
		if a.node == "" {
			return nil, errors.New("no --state and no node name: in cluster mode pass --node or set NODE_NAME (the downward API's spec.nodeName)")
		}
		cfg, err := restConfig(o.kubeconfig)
		if err != nil {
			return nil, err
		}
		opt := policy.Options{Node: a.node}
		if o.stateStore != "" {
			if err := os.MkdirAll(filepath.Dir(o.stateStore), 0o700); err != nil {
				log.Warn("cannot create the state store's directory; the last known policy will not be kept", "file", o.stateStore, "err", err)
			}
			snap, info, err := watch.LoadPersisted(o.stateStore, opt)
			switch {
			case err == nil:
				a.persisted = snap
				// The API source's snapshots come after it.
				opt.Generation = info.Generation
				log.Info("enforcing the last known policy until the API server's first complete list",
					"file", o.stateStore, "written_at", info.WrittenAt, "written_by", info.SluiceVersion,
					"generation", info.Generation, "pods", info.Pods, "policies", info.Policies)
			case errors.Is(err, watch.ErrNoPersisted):
				log.Info("no last known policy on this node yet; waiting for the API server's first complete list", "file", o.stateStore)
			default:
				log.Error("the last known policy cannot be used; waiting for the API server's first complete list", "err", err)
			}
		}
		src := watch.NewAPISource(cfg, opt, log, 0)
		src.Persist = watch.Persist{Path: o.stateStore, Version: version}
		a.source = src
	}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := watch.RegisterMetrics(a.reg); err != nil {
		return nil, fmt.Errorf("registering watch metrics: %w", err)
	}
	return a, nil
}

// run sets the agent up, enforces until ctx ends or the policy source fails, and takes down what
// it set up.
func (a *agent) run(ctx context.Context) (err error) {
	defer func() { err = errors.Join(err, a.undo.run(a.log)) }()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := a.start(ctx); err != nil {
		return err
	}

	first := make(chan struct{})
	var firstOnce sync.Once
	srcErr := make(chan error, 1)
	if a.persisted != nil {
		// Enforced at once, rules and all, however long the API server takes to answer.
		a.publish(a.persisted)
		firstOnce.Do(func() { close(first) })
	}
	go func() {
		srcErr <- a.source.Run(ctx, func(s *policy.Snapshot) {
			a.publish(s)
			firstOnce.Do(func() { close(first) })
		})
	}()
	var timeout <-chan time.Time
	if a.o.firstSnapshot > 0 {
		timeout = time.After(a.o.firstSnapshot)
	}
	select {
	case <-first:
	case err := <-srcErr:
		if err == nil {
			err = ctx.Err()
		}
		return fmt.Errorf("policy source ended before the first snapshot: %w", err)
	case <-timeout:
		return fmt.Errorf("no policy snapshot within %s (--first-snapshot-timeout)", a.o.firstSnapshot)
	case <-ctx.Done():
		return nil
	}

	if err := a.install(); err != nil {
		return err
	}
	a.integrity = newIntegrity(a)
	go a.integrity.run(ctx)
	a.log.Info("sluice agent running", "node", nodeLabel(a.node), "mode", a.o.mode, "fail_open", a.o.failOpen,
		"audit", a.o.audit, "cut_established", a.o.cut, "queues", a.o.queues, "metrics", a.o.metricsAddr)

	select {
	case <-ctx.Done():
		a.log.Info("stopping: removing kernel rules")
		return nil
	case err := <-srcErr:
		a.log.Error("policy source stopped; removing kernel rules", "err", err)
		return fmt.Errorf("policy source stopped: %w", err)
	}
}

// start builds the packet path and binds the queues. Queues come before rules: a rule that
// queues to an unbound queue drops (fail-closed) or bypasses sluice (fail-open).
func (a *agent) start(ctx context.Context) error {
	o := a.o
	var rec filter.FlowRecorder
	if o.offload {
		off, err := offload.New("sluice", o.offloadTimeout, a.log)
		if err != nil {
			return err
		}
		a.offload, rec = off, off
		// Closed after the rules that reference its sets are gone (the stack unwinds in
		// reverse).
		a.undo.push("removing offload sets", off.Close)
		a.reg.MustRegister(off)
	}
	a.engine = filter.NewEngine(filter.Config{
		QueueAll: a.queueAll, Audit: o.audit, CutEstablished: o.cut, FailOpen: o.failOpen,
		CacheSize: o.cacheSize, Log: a.log, Offload: rec, FaultStallPort: faultStallPort(a.log),
	})
	a.reg.MustRegister(newPacketCollector(a.engine))
	if o.cut {
		a.cutter = conntrack.NewCutter(a.engine.Snapshot, o.audit, a.log, a.reg)
	}
	q, err := queue.New(queue.Config{
		Spec:    a.spec,
		Handler: func(n uint16) queue.Handler { return a.engine.NewPath(n) },
		Mark:    o.mark,
		Log:     a.log,
		Metrics: queue.NewMetrics(a.reg),
	})
	if err != nil {
		return err
	}
	a.queues = q

	// The queue readers and the log writer get their own context: they must outlive the rules
	// on shutdown, so that no packet is queued to a queue nobody reads (a drop when
	// fail-closed).
	qctx, qcancel := context.WithCancel(context.Background())
	qdone, err := q.Run(qctx)
	if err != nil {
		qcancel()
		return err
	}
	var bg sync.WaitGroup
	bg.Add(1)
	go func() { defer bg.Done(); a.engine.RunLog(qctx) }()
	if a.cutter != nil {
		bg.Add(1)
		go func() { defer bg.Done(); a.cutter.Run(qctx) }()
	}
	a.undo.push("stopping the queue readers", func() error {
		qcancel()
		<-qdone
		bg.Wait()
		return nil
	})

	if o.metricsAddr != "" {
		go func() {
			if err := serveProbes(ctx, o.metricsAddr, a.reg, a.health, a.ready); err != nil {
				a.log.Error("metrics server stopped", "err", err)
			}
		}()
	}
	return nil
}

// publish puts a new snapshot in force: the packet path, the offload, the local pod sets, and a
// cut of the connections it denies when configured.
func (a *agent) publish(s *policy.Snapshot) {
	if err := a.engine.Publish(s); err != nil {
		a.log.Error("flushing offloaded verdicts failed; retrying at the next rule check, /healthz fails meanwhile", "err", err)
		a.staleOffload.Store(true)
	}
	if a.cutter != nil {
		a.cutter.Request()
	}
	a.updateLocalPods(s)
}

// install writes the kernel rules, with the local pods of the snapshots seen so far.
func (a *agent) install() error {
	var sets *offload.Sets
	if a.offload != nil {
		sets = a.offload.Sets()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := rules.Install(rules.Config{
		Queues: a.spec, QueueAll: a.queueAll, JudgeNode: a.o.judgeNode, Offload: sets,
		LocalPods: a.pending, PodInterfaces: a.podIfaces, Mark: a.o.mark,
		Admission: rules.Admission{Rate: a.o.admissionRate, Burst: a.o.admissionBurst},
		LockFile:  a.o.lockFile, Log: a.log,
	})
	if err != nil {
		return err
	}
	a.rules, a.local = r, a.pending
	if a.o.failOpen {
		a.undo.push("removing kernel rules", a.removeRules)
	} else {
		// Fail-closed: the rules stay, so that nothing passes unjudged until the next agent
		// adopts them; only verdicts the kernel could apply on its own are withdrawn.
		a.undo.push("keeping kernel rules (fail-closed)", a.keepRules)
	}
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

// keepRules is the fail-closed shutdown: the rules and local pod sets stay in force (with no
// reader bound and no --queue-bypass, every packet they queue is dropped), and offloaded allow
// verdicts are flushed, since nobody would flush them on the next policy change.
func (a *agent) keepRules() error {
	a.log.Info("fail-closed: leaving the kernel rules in place for the next agent (sluice agent --cleanup removes them)")
	if a.offload != nil {
		return a.offload.Forget()
	}
	return nil
}

func (a *agent) removeRules() error {
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

// health fails while a queue worker is stuck, or while stale offloaded verdicts could not be
// flushed.
func (a *agent) health() error {
	if err := a.queues.Health(); err != nil {
		return err
	}
	if a.integrity != nil {
		return a.integrity.offloadErr()
	}
	return nil
}

// ready is nil once the rules are installed, every queue is bound, a snapshot is in force and
// no worker is stuck.
func (a *agent) ready() error {
	a.mu.Lock()
	installed := a.rules != nil
	a.mu.Unlock()
	switch {
	case !installed:
		return errors.New("kernel rules not installed yet")
	case a.engine.Snapshot() == nil:
		return errors.New("no policy snapshot yet")
	}
	if err := a.integrity.err(); err != nil {
		return err
	}
	if err := a.queues.Bound(); err != nil {
		return err
	}
	return a.queues.Health()
}

// cleanups is a stack of undo steps, run last-in first-out.
type cleanups []cleanup

type cleanup struct {
	what string
	fn   func() error
}

func (c *cleanups) push(what string, fn func() error) { *c = append(*c, cleanup{what, fn}) }

// run undoes every step, newest first, and returns what failed; it empties the stack.
func (c *cleanups) run(log *slog.Logger) error {
	var errs []error
	for i := len(*c) - 1; i >= 0; i-- {
		step := (*c)[i]
		if err := step.fn(); err != nil {
			log.Error(step.what+" failed", "err", err)
			errs = append(errs, err)
		}
	}
	*c = nil
	log.Info("sluice agent stopped", "cleanup_errors", len(errs))
	return errors.Join(errs...)
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
