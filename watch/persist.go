package watch

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/sluice-dev/sluice/policy"
)

// The last-known-good state store. After each published snapshot the API source can write the
// State it compiled to a node-local file, so that an agent starting while the API server is
// unreachable (a node reboot during an outage, a rolling update) enforces the last policy it
// knew instead of nothing. The agent reads it back with LoadPersisted and enforces it until the
// API source's first complete list.
//
// The file is written atomically (a temporary file in the same directory, fsync, rename, fsync
// of the directory), so a crash leaves the old file or the new one, never half of one. Its
// layout:
//
//	SLUICE-STATE 1\n          the magic and the format version
//	{header JSON}\n           PersistInfo: sluice version, generation, time, body size and sha256
//	body                      three sections, each a uvarint length and a protobuf
//	                          NamespaceList, PodList, NetworkPolicyList (what policy reads)
//
// A file of another format version is refused (a clear error, never a guess); the sluice
// version that wrote it is recorded and reported but not required to match, since an upgrade is
// exactly when a restarting agent needs the file.

const (
	persistMagic   = "SLUICE-STATE"
	persistFormat  = 1
	maxPersistSize = 1 << 30 // a file larger than this is not ours
	// DefaultPersistEvery is the least time between two writes of the state file.
	DefaultPersistEvery = 10 * time.Second
	// DefaultStateStore is where the agent keeps the file on a node (a hostPath in the
	// DaemonSet).
	DefaultStateStore = "/var/lib/sluice/state"
)

// Persist configures the API source's last-known-good state store.
//
// How an agent uses it: at start, before the API source has listed anything, call
// LoadPersisted(path, policy.Options{Node: node}). On success, enforce that snapshot at once
// (install the rules with it in force) and create the API source with
// policy.Options{Node: node, Generation: info.Generation}, so that its first snapshot, published
// once the first complete list arrives (APISource.Ready), replaces the persisted one with a
// higher generation. On ErrNoPersisted (first start on this node) or any other error (log it:
// it says what is wrong), start as without a store. Either way set APISource.Persist to
// Persist{Path: path, Version: <the agent's version>}. The path must be node-local and
// writable (a hostPath), and survive the agent's restarts.
type Persist struct {
	// Path is the node-local file (a hostPath in the DaemonSet); empty turns the store off.
	Path string
	// Every is the least time between two writes (DefaultPersistEvery when <= 0): under churn
	// at most one write per Every, of the newest state, plus one when Run returns.
	Every time.Duration
	// Version is the sluice version stamped into the file (the main module's build info when
	// empty).
	Version string
}

// PersistInfo is the header of a state file.
type PersistInfo struct {
	SluiceVersion string    `json:"sluiceVersion"`
	Generation    uint64    `json:"generation"` // of the snapshot compiled from the state
	WrittenAt     time.Time `json:"writtenAt"`
	BodyBytes     int64     `json:"bodyBytes"`
	BodySHA256    string    `json:"bodySHA256"`
	Namespaces    int       `json:"namespaces"`
	Pods          int       `json:"pods"`
	Policies      int       `json:"policies"`
}

// ErrNoPersisted is LoadPersisted's error when there is no state file (errors.Is).
var ErrNoPersisted = errors.New("no persisted state")

// LoadPersisted reads the state file at path, checks its format version and integrity, and
// compiles it with opt (opt.IsolateInvalid set, as the API source compiles), stamped with the
// generation it had when written (PersistInfo.Generation): start the API source at that
// generation (Options.Generation) so that the snapshots after it keep increasing. Every
// failure is an error that says which (ErrNoPersisted when the file does not exist; a corrupt,
// truncated or foreign file; another format version), and garbage never panics.
func LoadPersisted(path string, opt policy.Options) (*policy.Snapshot, PersistInfo, error) {
	st, info, err := readPersisted(path)
	if err != nil {
		return nil, info, err
	}
	opt.IsolateInvalid = true
	opt.Generation = info.Generation
	snap, err := policy.Compile(st, opt)
	if snap == nil {
		return nil, info, fmt.Errorf("persisted state %s: %w", path, err)
	}
	return snap, info, nil
}

func readPersisted(path string) (*policy.State, PersistInfo, error) {
	var info PersistInfo
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, info, fmt.Errorf("persisted state %s: %w", path, ErrNoPersisted)
	}
	if err != nil {
		return nil, info, fmt.Errorf("persisted state: %w", err)
	}
	defer f.Close()
	bad := func(format string, args ...any) error {
		return fmt.Errorf("persisted state %s is corrupt or not a sluice state file (delete it; the agent writes a new one): %s", path, fmt.Sprintf(format, args...))
	}
	r := bufio.NewReader(io.LimitReader(f, maxPersistSize+1))
	magic, err := r.ReadString('\n')
	if err != nil || len(magic) > 64 {
		return nil, info, bad("no header line")
	}
	var format int
	if n, err := fmt.Sscanf(magic, persistMagic+" %d\n", &format); n != 1 || err != nil {
		return nil, info, bad("it does not start with %q", persistMagic)
	}
	if format != persistFormat {
		return nil, info, fmt.Errorf("persisted state %s has format version %d; this sluice reads version %d only (the agent writes a new file once it has a fresh state)", path, format, persistFormat)
	}
	header, err := r.ReadBytes('\n')
	if err != nil {
		return nil, info, bad("truncated header")
	}
	if err := json.Unmarshal(header, &info); err != nil {
		return nil, info, bad("header: %v", err)
	}
	if info.BodyBytes < 0 || info.BodyBytes > maxPersistSize {
		return nil, info, bad("header claims a body of %d bytes", info.BodyBytes)
	}
	body, err := io.ReadAll(io.LimitReader(r, info.BodyBytes+1))
	if err != nil {
		return nil, info, fmt.Errorf("persisted state %s: %w", path, err)
	}
	if int64(len(body)) != info.BodyBytes {
		return nil, info, bad("body is %d bytes, header says %d (truncated, or bytes after it)", len(body), info.BodyBytes)
	}
	if sum := sha256.Sum256(body); hex.EncodeToString(sum[:]) != info.BodySHA256 {
		return nil, info, bad("body checksum mismatch")
	}
	st, err := decodeState(body)
	if err != nil {
		return nil, info, bad("body: %v", err)
	}
	return st, info, nil
}

// encodeState writes the body: what policy reads of each object, as the informers keep it.
func encodeState(st *policy.State) ([]byte, error) {
	var out []byte
	for _, m := range []interface{ Marshal() ([]byte, error) }{
		&corev1.NamespaceList{Items: st.Namespaces},
		&corev1.PodList{Items: st.Pods},
		&networkingv1.NetworkPolicyList{Items: st.Policies},
	} {
		b, err := m.Marshal()
		if err != nil {
			return nil, err
		}
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out, nil
}

func decodeState(body []byte) (*policy.State, error) {
	var nss corev1.NamespaceList
	var pods corev1.PodList
	var pols networkingv1.NetworkPolicyList
	for i, m := range []interface{ Unmarshal([]byte) error }{&nss, &pods, &pols} {
		n, k := binary.Uvarint(body)
		if k <= 0 || n > uint64(len(body)-k) {
			return nil, fmt.Errorf("section %d: bad length", i)
		}
		if err := m.Unmarshal(body[k : k+int(n)]); err != nil {
			return nil, fmt.Errorf("section %d: %w", i, err)
		}
		body = body[k+int(n):]
	}
	if len(body) != 0 {
		return nil, fmt.Errorf("%d bytes after the last section", len(body))
	}
	return &policy.State{Namespaces: nss.Items, Pods: pods.Items, Policies: pols.Items}, nil
}

// writePersisted writes st atomically to path.
func writePersisted(path string, st *policy.State, info PersistInfo) error {
	body, err := encodeState(st)
	if err != nil {
		return fmt.Errorf("encoding the state: %w", err)
	}
	sum := sha256.Sum256(body)
	info.BodyBytes, info.BodySHA256 = int64(len(body)), hex.EncodeToString(sum[:])
	info.Namespaces, info.Pods, info.Policies = len(st.Namespaces), len(st.Pods), len(st.Policies)
	header, err := json.Marshal(info)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("persisting the state: %w (is %s a writable node-local directory?)", err, dir)
	}
	defer os.Remove(tmp.Name()) // after the rename there is nothing left to remove
	w := bufio.NewWriter(tmp)
	fmt.Fprintf(w, "%s %d\n", persistMagic, persistFormat)
	w.Write(header)
	w.WriteByte('\n')
	w.Write(body)
	if err := w.Flush(); err != nil {
		tmp.Close()
		return fmt.Errorf("persisting the state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("persisting the state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("persisting the state: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("persisting the state: %w", err)
	}
	// The rename is durable only once the directory is.
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("persisting the state: syncing %s: %w", dir, err)
		}
	}
	return nil
}

// persistJob is one state to write.
type persistJob struct {
	st  *policy.State
	gen uint64
}

// persister writes the newest state it was handed at most once per every, and once more when
// its context ends, from its own goroutine: a write of a large cluster's state takes time the
// compile loop should not wait for.
type persister struct {
	cfg  Persist
	log  *slog.Logger
	jobs chan persistJob // capacity 1: the newest state replaces one not written yet
	done chan struct{}
	last atomic.Int64 // when the last write started, unix nanoseconds; 0 before the first
}

func newPersister(cfg Persist, log *slog.Logger) *persister {
	if cfg.Every <= 0 {
		cfg.Every = DefaultPersistEvery
	}
	if cfg.Version == "" {
		cfg.Version = buildVersion()
	}
	return &persister{cfg: cfg, log: log, jobs: make(chan persistJob, 1), done: make(chan struct{})}
}

// wait is how long until the persister writes again; at most 0 when it would write a state
// offered now at once.
func (p *persister) wait() time.Duration {
	last := p.last.Load()
	if last == 0 {
		return 0
	}
	return p.cfg.Every - time.Since(time.Unix(0, last))
}

// offer hands the state of a published snapshot to the persister, replacing one it has not
// written yet. Only the compile loop calls it.
func (p *persister) offer(st *policy.State, gen uint64) {
	j := persistJob{st: st, gen: gen}
	for {
		select {
		case p.jobs <- j:
			return
		default:
			select {
			case <-p.jobs:
			default:
			}
		}
	}
}

// run writes until ctx is done, then writes what is pending and closes done.
func (p *persister) run(ctx context.Context) {
	defer close(p.done)
	var pending *persistJob
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case j := <-p.jobs:
			pending = &j
		case <-timer.C:
		case <-ctx.Done():
			select {
			case j := <-p.jobs:
				pending = &j
			default:
			}
			if pending != nil {
				p.write(*pending)
			}
			return
		}
		if pending == nil {
			continue
		}
		if wait := p.wait(); wait > 0 {
			timer.Reset(wait)
			continue
		}
		p.last.Store(time.Now().UnixNano())
		p.write(*pending)
		pending = nil
	}
}

func (p *persister) write(j persistJob) {
	start := time.Now()
	err := writePersisted(p.cfg.Path, j.st, PersistInfo{SluiceVersion: p.cfg.Version, Generation: j.gen, WrittenAt: start.UTC()})
	if err != nil {
		metricErrors.WithLabelValues("api", "persist").Inc()
		p.log.Error("could not persist the state; a restart during an API server outage would have no policy to enforce", "path", p.cfg.Path, "err", err)
		return
	}
	metricPersisted.Inc()
	metricLastPersist.Set(float64(time.Now().UnixNano()) / 1e9)
	p.log.Debug("state persisted", "path", p.cfg.Path, "generation", j.gen, "took", time.Since(start).Round(time.Millisecond).String())
}

func buildVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return bi.Main.Version + "+" + s.Value
			}
		}
		return bi.Main.Version
	}
	return "unknown"
}
