// Package rules writes the kernel side of the dataplane: a few iptables chains of sluice's own
// that send the packets it must judge to NFQUEUE, and the ipsets of local pod addresses they
// match, in the current network namespace.
package rules

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"

	"github.com/sluice-dev/sluice/filter/offload"
	"github.com/sluice-dev/sluice/filter/queue"
)

// The chains are written with iptables-restore --noflush, so every change is one atomic commit
// per table and address family and nothing outside our chains and our jumps is touched (see
// layout.go for what they hold). "Local pod" is membership in the ipsets sluice-local4 /
// sluice-local6, so a pod coming or going is one atomic set swap, not a rule rewrite. Native
// nftables `queue` is not used because kernels without CONFIG_NFT_QUEUE (this project's
// machines) lack it; the xt NFQUEUE target works through both iptables-nft and iptables-legacy.

const (
	LocalSet4 = "sluice-local4"
	LocalSet6 = "sluice-local6"

	// chainPrefix and setPrefix mark everything sluice owns; Cleanup removes exactly that.
	chainPrefix = "SLUICE-"
	setPrefix   = "sluice-"

	BackendNFT    = "iptables-nft"
	BackendLegacy = "iptables-legacy"
)

// tables sluice writes to.
var tables = []string{"filter", "raw"}

// DefaultLockFile serialises rule changes of concurrent sluice processes (a double start, the
// old and the new agent of a rolling update), so two installs can't both see "no jump yet" and
// insert one each. It must be on a path every agent of the node shares (the DaemonSet mounts
// the host's /run/sluice).
const DefaultLockFile = "/run/sluice/rules.lock"

// Config says what Install puts in the kernel.
type Config struct {
	// Queues are the queues the rules send packets to. With FailOpen the rule carries
	// --queue-bypass: with no program reading the queue, packets are accepted; without it they
	// are dropped (fail-closed).
	Queues queue.Spec
	// QueueAll queues every packet of flows touching local pods instead of only conntrack NEW.
	QueueAll bool
	// JudgeNode queues the node's own traffic to local pods (OUTPUT) too; by default it is
	// accepted, as upstream intends for kubelet probes.
	JudgeNode bool
	// LocalPods are the addresses whose traffic is judged; UpdateLocalPods replaces them.
	LocalPods []netip.Addr
	// Offload, when set, names hash:ip,port,ip sets (created by filter/offload) matched before
	// the NFQUEUE rule: a hit in Allow* accepts, in Deny* drops, without a trip to user space.
	// Empty names are skipped.
	Offload *offload.Sets
	// Backend forces "iptables-nft" or "iptables-legacy"; empty detects (see DetectBackend).
	Backend string
	// PodInterfaces are iptables interface patterns ("cali+") of the node side of pod
	// interfaces: packets from them with a source the pod does not own are dropped, and with
	// fail-closed so is the traffic of a pod interface whose address is in no snapshot. Empty:
	// no anti-spoofing.
	PodInterfaces []string
	// Mark is the pass mark bit of accepted packets (DefaultMark when 0); the queue readers set
	// it with their NF_REPEAT verdicts.
	Mark uint32
	// Admission bounds, per source address, the packets that may enter the queue, so one pod
	// cannot fill it (which, with fail-open, would let everyone's packets pass unjudged).
	Admission Admission
	// LockFile is DefaultLockFile when empty.
	LockFile string
	Log      *slog.Logger
}

// Admission is a per-source rate limit in front of the queue: Rate packets per second with
// bursts of Burst; Rate 0 switches it off.
type Admission struct{ Rate, Burst int }

// Rules is the installed rule set of one agent.
type Rules struct {
	cfg     Config
	backend string
	log     *slog.Logger

	mu sync.Mutex // sets and resync
	// want is what our chains hold right after the last install (as iptables-save shows them),
	// per family and table; localCount the addresses last written to each set.
	want       map[string][]string
	localCount map[string]int
	counters   runningCounters
	local      []netip.Addr
}

type runningCounters struct {
	Counters
	prev map[string]uint64 // kernel counters at the last read, by rule comment
}

type family struct {
	v6       bool
	name     string // for messages
	save     string
	restore  string
	localSet string
}

func families(backend string) []family {
	suffix := "-nft"
	if backend == BackendLegacy {
		suffix = "-legacy"
	}
	return []family{
		{false, "IPv4", "iptables" + suffix + "-save", "iptables" + suffix + "-restore", LocalSet4},
		{true, "IPv6", "ip6tables" + suffix + "-save", "ip6tables" + suffix + "-restore", LocalSet6},
	}
}

// Backend is the iptables flavour chosen, and why.
type Backend struct {
	Name string // BackendNFT or BackendLegacy
	Why  string
}

// DetectBackend chooses between iptables-nft and iptables-legacy for the current network
// namespace. Rules of both kinds can coexist in the kernel but their order relative to each other
// is not defined, so sluice follows whatever the node's other components (kube-proxy, the CNI)
// already use: the backend holding more rules wins, nft on a tie (the default of current
// distributions) when it works. Native nft `queue` is never used (see the package comment).
func DetectBackend() (Backend, error) {
	nftCount, nftErr := countRules(BackendNFT)
	legacyCount, legacyErr := countRules(BackendLegacy)
	switch {
	case nftErr != nil && legacyErr != nil:
		return Backend{}, fmt.Errorf("neither iptables-nft nor iptables-legacy works here (nft: %v; legacy: %v); install iptables (hack/deps.sh) and run as root", nftErr, legacyErr)
	case nftErr != nil:
		return Backend{BackendLegacy, fmt.Sprintf("iptables-nft unusable (%v)", nftErr)}, nil
	case legacyErr != nil:
		return Backend{BackendNFT, fmt.Sprintf("iptables-legacy unusable (%v)", legacyErr)}, nil
	case legacyCount > nftCount:
		return Backend{BackendLegacy, fmt.Sprintf("%d legacy rules vs %d nft rules already present", legacyCount, nftCount)}, nil
	}
	return Backend{BackendNFT, fmt.Sprintf("%d nft rules vs %d legacy rules already present; nft preferred on a tie", nftCount, legacyCount)}, nil
}

// countRules counts rules not ours in both families' filter, nat and mangle tables.
func countRules(backend string) (int, error) {
	n := 0
	for _, fam := range families(backend) {
		if _, err := exec.LookPath(fam.save); err != nil {
			return 0, fmt.Errorf("%s not found", fam.save)
		}
		out, err := runCmd(nil, fam.save)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "-A ") && !strings.Contains(line, chainPrefix) {
				n++
			}
		}
	}
	return n, nil
}

// Install installs (or replaces) sluice's chains, jumps and local-pod sets in the current
// network namespace. It is idempotent: chains left by a crash or a running twin are rewritten in
// place and jumps are kept to exactly one each.
func Install(cfg Config) (*Rules, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if err := cfg.Queues.Validate(); err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	if _, err := exec.LookPath("ipset"); err != nil {
		return nil, errors.New("rules: the ipset command is missing; install ipset (hack/deps.sh)")
	}
	if cfg.Mark == 0 {
		cfg.Mark = DefaultMark
	}
	if cfg.Mark&(cfg.Mark-1) != 0 {
		return nil, fmt.Errorf("rules: mark 0x%x must be a single bit", cfg.Mark)
	}
	if cfg.LockFile == "" {
		cfg.LockFile = DefaultLockFile
	}
	for _, p := range cfg.PodInterfaces {
		if !ifacePatternRE.MatchString(p) {
			return nil, fmt.Errorf("rules: pod interface pattern %q: use an interface name of up to 15 characters, optionally ending in + (a prefix)", p)
		}
	}
	be := Backend{cfg.Backend, "forced by configuration"}
	switch be.Name {
	case "":
		var err error
		if be, err = DetectBackend(); err != nil {
			return nil, fmt.Errorf("rules: %w", err)
		}
	case BackendNFT, BackendLegacy:
	default:
		return nil, fmt.Errorf("rules: unknown backend %q: use %s or %s", be.Name, BackendNFT, BackendLegacy)
	}
	backend := be.Name
	r := &Rules{cfg: cfg, backend: backend, log: cfg.Log}
	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := r.installLocked(cfg.LocalPods); err != nil {
		return nil, err
	}
	mode := "new-only"
	if cfg.QueueAll {
		mode = "queue-all"
	}
	cfg.Log.Info("kernel rules installed", "backend", backend, "why", be.Why,
		"queue_num", cfg.Queues.First, "queues", cfg.Queues.Count, "fail_open", cfg.Queues.FailOpen,
		"mode", mode, "judge_node", cfg.JudgeNode, "local_pods", len(cfg.LocalPods),
		"offload", cfg.Offload != nil, "pod_interfaces", strings.Join(cfg.PodInterfaces, ","),
		"admission_rate", cfg.Admission.Rate, "mark", fmt.Sprintf("0x%x", cfg.Mark))
	return r, nil
}

var ifacePatternRE = regexp.MustCompile(`^[A-Za-z0-9_.:@-]{1,15}\+?$`)

// installLocked writes the sets, then every table of every family, and remembers what our
// chains hold for the resync to compare against.
func (r *Rules) installLocked(local []netip.Addr) error {
	// The sets first: the rules refer to them by name and iptables refuses an unknown set.
	if err := r.updateSets(local); err != nil {
		return err
	}
	want := map[string][]string{}
	for _, fam := range families(r.backend) {
		for _, table := range tables {
			st, err := readTable(fam, table)
			if err != nil {
				return err
			}
			if err := restoreWith(r.backend, fam, r.script(fam, table, st)); err != nil {
				return fmt.Errorf("rules: install %s %s rules with %s: %w", fam.name, table, fam.restore, err)
			}
			after, err := readTable(fam, table)
			if err != nil {
				return err
			}
			want[fam.name+" "+table] = after.ours
		}
	}
	r.want = want
	return nil
}

// Backend names the iptables flavour in use: "iptables-nft" or "iptables-legacy".
func (r *Rules) Backend() string { return r.backend }

func restoreWith(backend string, fam family, script string) error {
	args := []string{"--noflush"}
	if backend == BackendLegacy {
		args = append(args, "-w", "5")
	}
	_, err := runCmd(strings.NewReader(script), fam.restore, args...)
	if err != nil {
		return fmt.Errorf("%w\nscript:\n%s", err, script)
	}
	return nil
}

// UpdateLocalPods atomically replaces the set of local pod addresses (one swap per family), so
// the rules judge exactly the new set from one packet to the next.
func (r *Rules) UpdateLocalPods(ips []netip.Addr) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.updateSets(ips)
}

const setOpts = "hashsize 1024 maxelem 1048576"

func (r *Rules) updateSets(ips []netip.Addr) error {
	var b strings.Builder
	n4, n6 := 0, 0
	for _, s := range []struct {
		name, fam string
		v6        bool
	}{{LocalSet4, "inet", false}, {LocalSet6, "inet6", true}} {
		tmp := s.name + "-new"
		// A -new set left by a crash is destroyed first (create would keep its old entries).
		exec.Command("ipset", "destroy", tmp).Run()
		fmt.Fprintf(&b, "create %s hash:ip family %s %s -exist\n", s.name, s.fam, setOpts)
		fmt.Fprintf(&b, "create %s hash:ip family %s %s\n", tmp, s.fam, setOpts)
		for _, ip := range ips {
			ip = ip.Unmap()
			if ip.Is6() == s.v6 && ip.IsValid() {
				fmt.Fprintf(&b, "add %s %s -exist\n", tmp, ip.WithZone(""))
				if s.v6 {
					n6++
				} else {
					n4++
				}
			}
		}
		fmt.Fprintf(&b, "swap %s %s\n", tmp, s.name)
		fmt.Fprintf(&b, "destroy %s\n", tmp)
	}
	if _, err := runCmd(strings.NewReader(b.String()), "ipset", "restore"); err != nil {
		return fmt.Errorf("rules: update local pod sets %s/%s: %w", LocalSet4, LocalSet6, err)
	}
	r.localCount = map[string]int{LocalSet4: n4, LocalSet6: n6}
	r.local = append(r.local[:0], ips...)
	r.log.Debug("local pod sets updated", "ipv4", n4, "ipv6", n6)
	return nil
}

// Remove deletes every rule, chain and local-pod set this Rules installed. Offload sets belong
// to filter/offload: close it after Remove (a set still referenced by a rule can't be destroyed).
func (r *Rules) Remove() error {
	unlock, err := r.lock()
	if err != nil {
		return err
	}
	defer unlock()
	var errs []error
	for _, fam := range families(r.backend) {
		for _, table := range tables {
			errs = append(errs, removeTable(r.backend, fam, table))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, s := range []string{LocalSet4, LocalSet6} {
		errs = append(errs, destroySet(s))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	r.log.Info("kernel rules removed", "backend", r.backend)
	return nil
}

// removeTable deletes every jump to a SLUICE-* chain and every SLUICE-* chain of one table in
// one commit.
func removeTable(backend string, fam family, table string) error {
	st, err := readTable(fam, table)
	if err != nil {
		return err
	}
	if len(st.chains) == 0 && len(st.jumpLines) == 0 {
		return nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "*%s\n", table)
	for _, l := range st.jumpLines {
		b.WriteString("-D" + strings.TrimPrefix(l, "-A") + "\n")
	}
	// Empty every chain first, then delete them: they reference one another.
	for _, c := range st.chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, c := range st.chains {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
	if err := restoreWith(backend, fam, b.String()); err != nil {
		return fmt.Errorf("rules: remove %s %s rules with %s: %w", fam.name, table, fam.restore, err)
	}
	return nil
}

func destroySet(name string) error {
	out, err := exec.Command("ipset", "destroy", name).CombinedOutput()
	if err != nil && !bytes.Contains(out, []byte("does not exist")) {
		return fmt.Errorf("rules: ipset destroy %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Cleanup removes everything sluice ever installs in the current network namespace, with
// either backend: jumps to SLUICE-* chains, the chains, and every ipset named sluice-* (local pod
// sets, and offload sets created with the "sluice" prefix). It is what `sluice agent --cleanup`
// runs after a crash; running it with nothing installed is fine.
func Cleanup(log *slog.Logger, lockFile string) error {
	if log == nil {
		log = slog.Default()
	}
	if lockFile == "" {
		lockFile = DefaultLockFile
	}
	unlock, err := lockRules(lockFile)
	if err != nil {
		return err
	}
	defer unlock()
	var errs []error
	found := false
	for _, backend := range []string{BackendNFT, BackendLegacy} {
		for _, fam := range families(backend) {
			if _, err := exec.LookPath(fam.save); err != nil {
				continue
			}
			for _, table := range tables {
				st, err := readTable(fam, table)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				if len(st.chains) > 0 || len(st.jumpLines) > 0 {
					found = true
					log.Info("removing leftover sluice rules", "backend", backend, "family", fam.name,
						"table", table, "chains", len(st.chains), "jumps", len(st.jumpLines))
					errs = append(errs, removeTable(backend, fam, table))
				}
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if _, err := exec.LookPath("ipset"); err != nil {
		return nil
	}
	out, err := runCmd(nil, "ipset", "list", "-n")
	if err != nil {
		return fmt.Errorf("rules: list ipsets: %w", err)
	}
	for _, name := range strings.Fields(out) {
		if strings.HasPrefix(name, setPrefix) {
			found = true
			log.Info("removing leftover sluice ipset", "set", name)
			errs = append(errs, destroySet(name))
		}
	}
	if !found {
		log.Info("no sluice rules or sets found")
	}
	return errors.Join(errs...)
}

// lockRules takes an exclusive flock shared by every sluice process on the machine. Rule
// changes take milliseconds, so the wait is short even across network namespaces. Where the
// lock file can't be created (a read-only /run in a container), changes go ahead unlocked: a
// double start is then only as safe as iptables' own locking, which beats refusing to start.
func (r *Rules) lock() (func(), error) { return lockRules(r.cfg.LockFile) }

func lockRules(lockFile string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(lockFile), 0o700); err != nil {
		slog.Default().Warn("rules: cannot create the lock file's directory; changing rules without it", "file", lockFile, "err", err)
		return func() {}, nil
	}
	f, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		slog.Default().Warn("rules: cannot open the lock file; changing rules without it", "file", lockFile, "err", err)
		return func() {}, nil
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("rules: lock %s: %w", lockFile, err)
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func runCmd(stdin *strings.Reader, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
