package watch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"

	"github.com/sluice-dev/sluice/policy"
)

// DefaultDebounce is the file source's quiet time after a change before it reads the file
// (editors write a file in several steps), and the longest time the API source leaves between
// two builds under churn (it spaces them by 20 times the last build's cost, at least 10 ms, so
// that builds keep at most a twentieth of a core from the packets; a change after an idle
// window is built at once).
const DefaultDebounce = 100 * time.Millisecond

// DefaultSettle is how long the file source waits for a state file whose last line is not
// finished (no newline at the end) to change again before it applies it as it is.
const DefaultSettle = 2 * time.Second

// FileSource reads a state file (the format of policy.Load) and re-reads it when it changes.
// A file that cannot be read or is invalid is logged and the last good snapshot stays in force;
// only the very first load is fatal, since then there is nothing to enforce.
//
// A file is read once per change, and the bytes read are both hashed (a save without changes
// publishes nothing) and parsed, so the snapshot in force is always exactly the content the hash
// names. A read that is not a whole file keeps the last good snapshot: when the file changed
// while it was read, it is read again after Debounce; when it is empty or its last line is
// unfinished (a writer that truncates and rewrites in place, caught in the middle; every YAML
// writer ends its output with a newline), it is applied only if it is still the same after
// Settle.
type FileSource struct {
	path string
	opt  policy.Options
	log  *slog.Logger
	// Debounce is the quiet time after the last change before the file is re-read.
	Debounce time.Duration
	// Settle is how long a file with an unfinished last line must stay unchanged to be applied.
	Settle time.Duration

	ready atomic.Bool
}

// NewFileSource returns a source for the state file at path. opt.Node selects the local pods;
// opt.Generation is the generation before the first snapshot (each snapshot gets the next one).
// A file is applied whole or not at all, so opt.IsolateInvalid is cleared: a policy in it that
// does not compile keeps the last good snapshot in force, like any other error in the file.
func NewFileSource(path string, opt policy.Options, log *slog.Logger) *FileSource {
	if log == nil {
		log = slog.Default()
	}
	opt.IsolateInvalid = false
	return &FileSource{path: path, opt: opt, log: log.With("source", "file", "path", path), Debounce: DefaultDebounce, Settle: DefaultSettle}
}

// Ready reports whether the first snapshot has been published.
func (s *FileSource) Ready() bool { return s.ready.Load() }

// Run publishes the file's snapshot, then a new one after every change, until ctx is done. It
// returns an error only when the first load fails or the file cannot be watched.
func (s *FileSource) Run(ctx context.Context, publish func(*policy.Snapshot)) error {
	abs, err := filepath.Abs(s.path)
	if err != nil {
		return fmt.Errorf("state file %s: %w", s.path, err)
	}
	// The directory is watched, not the file: editors and ConfigMap volumes replace the file by
	// a rename, which ends a watch on the old inode.
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching state file %s: %w (raise fs.inotify.max_user_instances if the limit is reached)", s.path, err)
	}
	defer w.Close()
	if err := w.Add(filepath.Dir(abs)); err != nil {
		return fmt.Errorf("watching the directory of state file %s: %w (does the directory exist?)", s.path, err)
	}

	debounce, settle := s.Debounce, s.Settle
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	if settle <= 0 {
		settle = DefaultSettle
	}
	pub := newPublisher("file", s.opt, s.log)
	objs := newFileObjects(s.opt)
	// The watch is set up before the first read, so a write in between is not missed.
	timer := time.NewTimer(0)
	defer timer.Stop()
	var (
		inForce    []byte    // sha256 of the bytes the snapshot in force was built from; nil before the first
		unfinished []byte    // sha256 of a read with an unfinished last line, waiting out settle
		changedAt  time.Time // first event of the burst being debounced; zero when none pending
	)
	base := filepath.Base(abs)
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("state file watcher closed")
			}
			if !relevant(ev, base) {
				continue
			}
			if changedAt.IsZero() {
				changedAt = time.Now()
			}
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("state file watcher closed")
			}
			// An overflowed inotify queue loses events; re-read to be sure nothing was missed.
			s.log.Warn("state file watch error; re-reading the file", "err", err)
			metricErrors.WithLabelValues("file", "watch").Inc()
			if changedAt.IsZero() {
				changedAt = time.Now()
			}
			timer.Reset(debounce)
		case <-timer.C:
			raw, err := readWhole(abs)
			if errors.Is(err, errChanging) {
				s.log.Debug("state file changed while it was read; reading it again", "after", debounce)
				timer.Reset(debounce)
				continue
			}
			if err == nil {
				sum := sha256.Sum256(raw)
				switch {
				case bytes.Equal(sum[:], inForce): // same bytes as the snapshot in force
					unfinished = nil
					changedAt = time.Time{}
					metricStale.WithLabelValues("file").Set(0)
					continue
				case (len(raw) == 0 || raw[len(raw)-1] != '\n') && !bytes.Equal(sum[:], unfinished):
					// Empty too: a writer that truncates before it writes leaves that first.
					s.log.Info("state file ends in the middle of a line; waiting for the write to finish before applying it",
						"settle", settle, "generation", pub.gen)
					unfinished = sum[:]
					timer.Reset(settle)
					continue
				}
				unfinished = nil
				var snap *policy.Snapshot
				if snap, err = s.load(pub, objs, abs, raw); err == nil {
					inForce = sum[:]
					metricStale.WithLabelValues("file").Set(0)
					publish(snap)
					pub.published(snap, changedAt)
					changedAt = time.Time{}
					s.ready.Store(true)
					continue
				}
			}
			metricErrors.WithLabelValues("file", "load").Inc()
			if inForce == nil {
				return fmt.Errorf("state file %s: %w", s.path, err)
			}
			changedAt = time.Time{}
			metricStale.WithLabelValues("file").Set(1)
			s.log.Error("state file not applied; the last good snapshot stays in force until the file is fixed",
				"err", err, "generation", pub.gen)
		}
	}
}

// errChanging says a read did not see one version of the file.
var errChanging = errors.New("the file changed while it was read")

// readWhole reads path through one open file, and fails with errChanging when the file's size
// or modification time moved during the read, or the bytes read are not its size (a writer
// truncating or appending meanwhile).
func readWhole(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	before, err := f.Stat()
	if err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	after, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if before.Mode().IsRegular() &&
		(before.Size() != after.Size() || !before.ModTime().Equal(after.ModTime()) || int64(len(raw)) != after.Size()) {
		return nil, errChanging
	}
	return raw, nil
}

// relevant reports whether ev may have changed the file named base. Names starting with ".."
// are the symlinks a Kubernetes ConfigMap volume swaps atomically ("..data"), behind which the
// file itself never sees an event.
func relevant(ev fsnotify.Event, base string) bool {
	if !ev.Has(fsnotify.Write) && !ev.Has(fsnotify.Create) && !ev.Has(fsnotify.Rename) && !ev.Has(fsnotify.Remove) {
		return false
	}
	name := filepath.Base(ev.Name)
	return name == base || strings.HasPrefix(name, "..")
}

// load parses raw, the bytes read from the file at path, and builds its snapshot: a patch of
// the last one when only some objects changed, so that the flow caches and the offload keep the
// verdicts of what did not.
func (s *FileSource) load(pub *publisher, objs *fileObjects, path string, raw []byte) (*policy.Snapshot, error) {
	st, notes, err := policy.Load(bytes.NewReader(raw), path)
	if err != nil {
		return nil, err
	}
	for _, n := range notes {
		s.log.Info("state file note", "note", n)
	}
	objs.update(st)
	snap, err := pub.build(objs.b)
	if err != nil {
		return nil, fmt.Errorf("compiling the policies: %w", err)
	}
	return snap, nil
}

// fileObjects are the objects of the last file read, in a Builder: each new file tells it
// only the objects that were added, changed or removed.
type fileObjects struct {
	b    *policy.Builder
	nss  map[string]*corev1.Namespace
	pods map[policy.PodRef]*corev1.Pod
	pols map[policy.PodRef]*networkingv1.NetworkPolicy
}

func newFileObjects(opt policy.Options) *fileObjects {
	return &fileObjects{b: policy.NewBuilder(opt)}
}

// update tells the Builder how st differs from the last file (policy.Load has refused a file
// that names an object twice).
func (o *fileObjects) update(st *policy.State) {
	o.nss = diffObjects(o.nss, st.Namespaces, func(ns *corev1.Namespace) string { return ns.Name },
		o.b.SetNamespace, o.b.DeleteNamespace)
	o.pods = diffObjects(o.pods, st.Pods, func(p *corev1.Pod) policy.PodRef { return policy.PodRef{Namespace: p.Namespace, Name: p.Name} },
		o.b.SetPod, func(r policy.PodRef) { o.b.DeletePod(r.Namespace, r.Name) })
	o.pols = diffObjects(o.pols, st.Policies, func(np *networkingv1.NetworkPolicy) policy.PodRef {
		return policy.PodRef{Namespace: np.Namespace, Name: np.Name}
	}, o.b.SetPolicy, func(r policy.PodRef) { o.b.DeletePolicy(r.Namespace, r.Name) })
}

// diffObjects indexes items by key, calls set for each one that is new or differs from its
// version in last and del for each key of last that is gone, and returns the index.
func diffObjects[K comparable, T any](last map[K]*T, items []T, key func(*T) K, set func(*T), del func(K)) map[K]*T {
	now := make(map[K]*T, len(items))
	for i := range items {
		now[key(&items[i])] = &items[i]
	}
	for k, it := range now {
		if old, ok := last[k]; !ok || !apiequality.Semantic.DeepEqual(old, it) {
			set(it)
		}
	}
	for k := range last {
		if _, ok := now[k]; !ok {
			del(k)
		}
	}
	return now
}
