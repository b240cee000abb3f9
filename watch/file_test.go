package watch

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluice-dev/sluice/policy"
)

const fileStateHeader = `apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {tier: frontend}
spec:
  containers: [{name: c, image: x}]
status:
  podIP: 10.244.0.10
  podIPs: [{ip: 10.244.0.10}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: shop
  labels: {tier: database}
spec:
  containers: [{name: c, image: x}]
status:
  podIP: 10.244.0.20
  podIPs: [{ip: 10.244.0.20}]
`

// dbPolicy lets the frontend reach the database on port.
func dbPolicy(port string) string {
	return `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: database
  namespace: shop
spec:
  podSelector: {matchLabels: {tier: database}}
  ingress:
  - from: [{podSelector: {matchLabels: {tier: frontend}}}]
    ports: [{port: ` + port + `}]
`
}

var webToDB = func(port uint16) policy.Flow {
	return policy.Flow{Src: netip.MustParseAddr("10.244.0.10"), Dst: netip.MustParseAddr("10.244.0.20"), Proto: policy.TCP, Port: port}
}

// writeAtomic replaces path the way editors and kubectl-style writers do: a new file renamed
// over the old one, so the watch on the old inode ends.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// nextSnap waits (bounded) for the next published snapshot.
func nextSnap(t *testing.T, ch <-chan *policy.Snapshot, what string) *policy.Snapshot {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(10 * time.Second):
		t.Fatalf("no snapshot published within 10 s: %s", what)
		return nil
	}
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not true within 10 s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestFileSourceReloads(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.yaml")
	writeAtomic(t, path, fileStateHeader+dbPolicy("5432"))

	src := NewFileSource(path, policy.Options{}, testLogger(t))
	src.Debounce = 20 * time.Millisecond
	ch := make(chan *policy.Snapshot, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(s *policy.Snapshot) { ch <- s }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run after cancel: %v", err)
		}
	}()

	s1 := nextSnap(t, ch, "first load")
	eventually(t, "Ready() after the first snapshot", src.Ready)
	if s1.Generation() != 1 {
		t.Errorf("first generation %d, want 1", s1.Generation())
	}
	if v := s1.Decide(webToDB(5432)); !v.Allowed {
		t.Fatalf("web->db:5432 denied by the first snapshot: %v", v)
	}
	if v := s1.Decide(webToDB(6379)); v.Allowed {
		t.Fatalf("web->db:6379 allowed by the first snapshot: %v", v)
	}

	// A bad rewrite: logged, counted, nothing published; the last good snapshot stays.
	loadErrs := metricValue(metricErrors.WithLabelValues("file", "load"))
	writeAtomic(t, path, fileStateHeader+"---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {matchExpressions: [{key: tier, operator: Bogus}]}\n")
	eventually(t, "the bad file is counted as a load error", func() bool {
		return metricValue(metricErrors.WithLabelValues("file", "load")) > loadErrs
	})
	if got := metricValue(metricStale.WithLabelValues("file")); got != 1 {
		t.Errorf("stale gauge %v after a bad file, want 1", got)
	}
	select {
	case s := <-ch:
		t.Fatalf("a bad file published generation %d", s.Generation())
	default:
	}

	// A good rewrite publishes the next generation with the new rules.
	writeAtomic(t, path, fileStateHeader+dbPolicy("6379"))
	s2 := nextSnap(t, ch, "good rewrite")
	if s2.Generation() <= s1.Generation() {
		t.Errorf("generation went from %d to %d", s1.Generation(), s2.Generation())
	}
	if v := s2.Decide(webToDB(6379)); !v.Allowed {
		t.Errorf("web->db:6379 denied after the rewrite: %v", v)
	}
	if v := s2.Decide(webToDB(5432)); v.Allowed {
		t.Errorf("web->db:5432 still allowed after the rewrite: %v", v)
	}
	if got := metricValue(metricStale.WithLabelValues("file")); got != 0 {
		t.Errorf("stale gauge %v after a good file, want 0", got)
	}

	// An in-place write (no rename) is seen too.
	if err := os.WriteFile(path, []byte(fileStateHeader), 0o644); err != nil {
		t.Fatal(err)
	}
	s3 := nextSnap(t, ch, "in-place write")
	if v := s3.Decide(webToDB(5432)); !v.Allowed || v.Reason != policy.ReasonUnisolated {
		t.Errorf("web->db:5432 after removing the policy: %v, want allowed/unisolated", v)
	}
	if s3.Generation() <= s2.Generation() {
		t.Errorf("generation went from %d to %d", s2.Generation(), s3.Generation())
	}
}

func TestFileSourceFirstLoadFails(t *testing.T) {
	dir := t.TempDir()
	src := NewFileSource(filepath.Join(dir, "missing.yaml"), policy.Options{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	published := false
	err := src.Run(ctx, func(*policy.Snapshot) { published = true })
	if err == nil {
		t.Fatal("Run on a missing file returned nil")
	}
	if published || src.Ready() {
		t.Error("a failed first load published a snapshot")
	}
	t.Logf("error as the operator sees it: %v", err)

	bad := filepath.Join(dir, "bad.yaml")
	writeAtomic(t, bad, "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: x, namespace: y}\nspec: {podSelector: {matchLabels: {\"bad key!\": v}}}\n")
	if err := NewFileSource(bad, policy.Options{}, testLogger(t)).Run(ctx, func(*policy.Snapshot) { published = true }); err == nil || published {
		t.Fatalf("Run on an invalid file: err %v, published %v", err, published)
	}
}

// metricValue reads a counter or gauge (prometheus' testutil would pull in another module).
func metricValue(m prometheus.Metric) float64 {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		panic(err)
	}
	switch {
	case out.Counter != nil:
		return out.Counter.GetValue()
	case out.Gauge != nil:
		return out.Gauge.GetValue()
	}
	panic("metricValue: not a counter or gauge")
}

// A ConfigMap volume never writes the file itself: it writes a new timestamped directory and
// swaps the "..data" symlink to it by rename. The source must follow that too.
func TestFileSourceConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	version := func(name, content string) {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name, "state.yaml"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(name, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	version("..2026_11_25_08_00_00.1", fileStateHeader+dbPolicy("5432"))
	if err := os.Symlink(filepath.Join("..data", "state.yaml"), filepath.Join(dir, "state.yaml")); err != nil {
		t.Fatal(err)
	}

	src := NewFileSource(filepath.Join(dir, "state.yaml"), policy.Options{}, testLogger(t))
	src.Debounce = 20 * time.Millisecond
	ch := make(chan *policy.Snapshot, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(s *policy.Snapshot) { ch <- s }) }()
	defer func() { cancel(); <-done }()

	if v := nextSnap(t, ch, "first load").Decide(webToDB(5432)); !v.Allowed {
		t.Fatalf("web->db:5432 denied by the first snapshot: %v", v)
	}
	version("..2026_11_25_08_05_00.2", fileStateHeader+dbPolicy("6379"))
	s := nextSnap(t, ch, "ConfigMap-style symlink swap")
	if v := s.Decide(webToDB(6379)); !v.Allowed {
		t.Errorf("web->db:6379 denied after the swap: %v", v)
	}
	if v := s.Decide(webToDB(5432)); v.Allowed {
		t.Errorf("web->db:5432 still allowed after the swap: %v", v)
	}
}

// guardDB isolates the database for ingress, allowing nothing; written in block style so that
// a prefix of it still parses.
const guardDB = `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: guard
  namespace: shop
spec:
  policyTypes: [Ingress]
  podSelector:
    matchLabels:
      tier: database
`

// runFile starts a file source on path and returns its snapshots.
func runFile(t *testing.T, path string, settle time.Duration) <-chan *policy.Snapshot {
	t.Helper()
	src := NewFileSource(path, policy.Options{}, testLogger(t))
	src.Debounce, src.Settle = 20*time.Millisecond, settle
	ch := make(chan *policy.Snapshot, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(s *policy.Snapshot) { ch <- s }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run after cancel: %v", err)
		}
	})
	return ch
}

func writeInPlace(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A writer that truncates the file and writes it again, caught in the middle: the prefix it
// has written parses (it selects "tier: data", so it would open the database), but its last
// line is unfinished, so the last good snapshot stays until the write completes; then each
// complete version, including a revert to the earlier content, is applied.
func TestFileSourcePartialWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.yaml")
	guarded, open := fileStateHeader+guardDB, fileStateHeader+dbPolicy("5432")
	partial := guarded[:len(guarded)-len("base\n")]
	if !strings.HasSuffix(partial, "tier: data") {
		t.Fatalf("the partial write should end in the middle of the selector: %q", partial[len(partial)-20:])
	}
	// Control: the partial content, were it applied, would open the database.
	st, _, err := policy.Load(strings.NewReader(partial), "partial")
	if err != nil {
		t.Fatalf("the partial write does not even parse, so the test would prove nothing: %v", err)
	}
	if snap, err := policy.Compile(st, policy.Options{}); err != nil || !snap.Decide(webToDB(6379)).Allowed {
		t.Fatalf("the partial write would not open the database (%v), so the test would prove nothing", err)
	}

	writeInPlace(t, path, guarded)
	ch := runFile(t, path, time.Minute)
	s1 := nextSnap(t, ch, "first load")
	if v := s1.Decide(webToDB(6379)); v.Allowed {
		t.Fatalf("web->db:6379 allowed by the guarded state: %v", v)
	}

	writeInPlace(t, path, partial)
	select {
	case s := <-ch:
		t.Fatalf("a write caught in the middle published generation %d (web->db:6379 %v)", s.Generation(), s.Decide(webToDB(6379)))
	case <-time.After(500 * time.Millisecond): // 25 debounce periods
	}

	// The writer finishes with other content; then reverts to the content before it.
	writeInPlace(t, path, open)
	s2 := nextSnap(t, ch, "the finished write")
	if v := s2.Decide(webToDB(5432)); !v.Allowed || v.Reason != policy.ReasonRule {
		t.Errorf("web->db:5432 after the finished write: %v, want allowed by the rule", v)
	}
	writeInPlace(t, path, guarded[:len(guarded)-10])
	writeInPlace(t, path, guarded)
	s3 := nextSnap(t, ch, "the revert to the guarded state")
	if v := s3.Decide(webToDB(5432)); v.Allowed {
		t.Errorf("web->db:5432 allowed after the revert to the guarded state: %v", v)
	}
	if s3.Generation() <= s2.Generation() {
		t.Errorf("generation went from %d to %d", s2.Generation(), s3.Generation())
	}
}

// A file that really ends without a newline (hand-written) is applied once it has stayed the
// same for Settle.
func TestFileSourceSettlesUnfinishedLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.yaml")
	content := strings.TrimSuffix(fileStateHeader+dbPolicy("5432"), "\n")
	writeInPlace(t, path, content)
	start := time.Now()
	ch := runFile(t, path, 300*time.Millisecond)
	s := nextSnap(t, ch, "a file without a final newline, after Settle")
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Errorf("applied after %v, before Settle (300ms)", waited)
	}
	if v := s.Decide(webToDB(5432)); !v.Allowed {
		t.Errorf("web->db:5432 denied by the settled file: %v", v)
	}
}

// TestFileSourcePatches: a rewrite that changes one pod patches the last snapshot, which then
// vouches for the flows between the pods it did not touch (what keeps the flow caches and the
// offload warm), and answers as a fresh compile of the file would.
func TestFileSourcePatches(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.yaml")
	cache := `---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: shop, labels: {tier: cache}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.30, podIPs: [{ip: 10.244.0.30}]}
`
	writeAtomic(t, path, fileStateHeader+cache+dbPolicy("5432"))
	ch := runFile(t, path, time.Second)
	s1 := nextSnap(t, ch, "first load")
	patches := metricValue(metricBuilds.WithLabelValues("file", "patch"))

	relabelled := strings.Replace(cache, "tier: cache", "tier: frontend", 1)
	writeAtomic(t, path, fileStateHeader+relabelled+dbPolicy("5432"))
	s2 := nextSnap(t, ch, "the cache pod relabelled")
	if got := metricValue(metricBuilds.WithLabelValues("file", "patch")); got != patches+1 {
		t.Fatalf("the rewrite was not built as a patch (sluice_watch_builds_total{kind=patch} %v -> %v)", patches, got)
	}
	cacheToDB := policy.Flow{Src: netip.MustParseAddr("10.244.0.30"), Dst: netip.MustParseAddr("10.244.0.20"), Proto: policy.TCP, Port: 5432}
	if !s2.Unchanged(webToDB(5432), s1.Serial()) {
		t.Error("web -> db: the patch touched neither pod, but the new snapshot does not vouch for the old verdict")
	}
	if s2.Unchanged(cacheToDB, s1.Serial()) {
		t.Error("cache -> db: the patch relabelled the cache pod, but the new snapshot vouches for the old verdict")
	}
	st, _, err := policy.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fresh, err := policy.Compile(st, policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []policy.Flow{webToDB(5432), webToDB(6379), cacheToDB} {
		if got, want := s2.Decide(f), fresh.Decide(f); got != want {
			t.Errorf("%v: the patched snapshot says %v, a fresh compile %v", f, got, want)
		}
	}
	if s1.Decide(cacheToDB).Allowed || !s2.Decide(cacheToDB).Allowed {
		t.Errorf("cache -> db:5432 went from %v to %v, want denied, then allowed", s1.Decide(cacheToDB), s2.Decide(cacheToDB))
	}

	// The same pod twice (which the Builder could not hold): the file is refused and the last
	// snapshot stays.
	loadErrs := metricValue(metricErrors.WithLabelValues("file", "load"))
	writeAtomic(t, path, fileStateHeader+relabelled+cache+dbPolicy("5432"))
	eventually(t, "a file with a pod twice is counted as a load error", func() bool {
		return metricValue(metricErrors.WithLabelValues("file", "load")) > loadErrs
	})
	select {
	case s := <-ch:
		t.Fatalf("a file with a pod twice published generation %d", s.Generation())
	default:
	}
}
