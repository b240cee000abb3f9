package watch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/sluice-dev/sluice/policy"
)

// DefaultDebounce is how long a source waits for changes to settle before compiling. Editors
// write a file in several steps and a kubectl apply touches many objects; compiling once per
// burst keeps the CPU for packets.
const DefaultDebounce = 100 * time.Millisecond

// FileSource reads a state file (the format of policy.LoadFile) and re-reads it when it changes.
// A file that cannot be read or is invalid is logged and the last good snapshot stays in force;
// only the very first load is fatal, since then there is nothing to enforce.
type FileSource struct {
	path string
	opt  policy.Options
	log  *slog.Logger
	// Debounce is the quiet time after the last change before the file is re-read.
	Debounce time.Duration

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
	return &FileSource{path: path, opt: opt, log: log.With("source", "file", "path", path), Debounce: DefaultDebounce}
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

	pub := newPublisher("file", s.opt, s.log)
	// The watch is set up before the first read, so a write in between is not missed.
	snap, sum, err := s.load(pub, abs, nil)
	if err != nil {
		metricErrors.WithLabelValues("file", "load").Inc()
		return fmt.Errorf("state file %s: %w", s.path, err)
	}
	publish(snap)
	pub.published(snap, time.Time{})
	s.ready.Store(true)
	metricStale.WithLabelValues("file").Set(0)

	debounce := s.Debounce
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var changedAt time.Time // first event of the burst being debounced; zero when none pending
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
			at := changedAt
			changedAt = time.Time{}
			next, nextSum, err := s.load(pub, abs, sum)
			if err != nil {
				metricErrors.WithLabelValues("file", "load").Inc()
				metricStale.WithLabelValues("file").Set(1)
				s.log.Error("state file not applied; the last good snapshot stays in force until the file is fixed",
					"err", err, "generation", pub.gen)
				continue
			}
			metricStale.WithLabelValues("file").Set(0)
			if next == nil { // same bytes as the snapshot in force
				continue
			}
			sum = nextSum
			publish(next)
			pub.published(next, at)
		}
	}
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

// load reads and compiles the file. When its bytes hash to prev it returns a nil snapshot: a
// save without changes should not renumber the snapshot and flush every flow cache.
func (s *FileSource) load(pub *publisher, path string, prev []byte) (*policy.Snapshot, []byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	h := sha256.Sum256(raw)
	if prev != nil && bytes.Equal(h[:], prev) {
		return nil, prev, nil
	}
	st, notes, err := policy.LoadFile(path)
	if err != nil {
		return nil, nil, err
	}
	for _, n := range notes {
		s.log.Info("state file note", "note", n)
	}
	snap, err := pub.compile(st)
	if err != nil {
		return nil, nil, fmt.Errorf("compiling the policies: %w", err)
	}
	return snap, h[:], nil
}
