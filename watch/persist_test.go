package watch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/clustergen"
	"github.com/sluice-dev/sluice/policy"
)

// persistState is the file source's test state with its database policy, as a State.
func persistState(t testing.TB) *policy.State {
	st, _, err := policy.Load(strings.NewReader(fileStateHeader+dbPolicy("5432")), "state")
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func validPersistFile(t testing.TB, dir string) string {
	path := filepath.Join(dir, "state")
	if err := writePersisted(path, persistState(t), PersistInfo{SluiceVersion: "v1.2.3", Generation: 41, WrittenAt: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
	return path
}

// validPersistBytes is the content of a valid state file.
func validPersistBytes(t testing.TB) []byte {
	b, err := os.ReadFile(validPersistFile(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestPersistRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := validPersistFile(t, dir)
	snap, info, err := LoadPersisted(path, policy.Options{Node: "", Generation: 7})
	if err != nil {
		t.Fatal(err)
	}
	if info.Generation != 41 || snap.Generation() != 41 || info.SluiceVersion != "v1.2.3" || info.Pods != 2 || info.Policies != 1 || info.Namespaces != 1 {
		t.Errorf("header %+v, snapshot generation %d; want generation 41 (as written), v1.2.3, 1 namespace, 2 pods, 1 policy", info, snap.Generation())
	}
	want, err := policy.Compile(persistState(t), policy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, port := range []uint16{5432, 6379} {
		if got, w := snap.Decide(webToDB(port)), want.Decide(webToDB(port)); got != w {
			t.Errorf("web->db:%d from the persisted state %+v, from the state %+v", port, got, w)
		}
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v (%v), want 0600: it holds the cluster's pods and policies", fi.Mode(), err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

// Every kind of bad file is a clear error, never a snapshot.
func TestPersistRejectsBadFiles(t *testing.T) {
	dir := t.TempDir()
	good := validPersistBytes(t)
	if _, _, err := LoadPersisted(filepath.Join(dir, "missing"), policy.Options{}); !errors.Is(err, ErrNoPersisted) {
		t.Errorf("missing file: %v, want ErrNoPersisted", err)
	}
	flipped := bytes.Clone(good)
	flipped[len(flipped)-3] ^= 0x40
	otherFormat := bytes.Replace(good, []byte("SLUICE-STATE 1\n"), []byte("SLUICE-STATE 2\n"), 1)
	for _, c := range []struct {
		name, want string
		data       []byte
	}{
		{"empty", "corrupt", nil},
		{"truncated body", "truncated", good[:len(good)-10]},
		{"truncated header", "corrupt", good[:20]},
		{"a flipped bit", "checksum", flipped},
		{"another format version", "format version 2", otherFormat},
		{"a YAML state file", "does not start with", []byte(fileStateHeader)},
		{"trailing garbage", "truncated", append(bytes.Clone(good), "more"...)},
	} {
		path := filepath.Join(dir, "bad")
		if err := os.WriteFile(path, c.data, 0o600); err != nil {
			t.Fatal(err)
		}
		snap, _, err := LoadPersisted(path, policy.Options{})
		if err == nil || snap != nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: snapshot %v, error %v; want an error saying %q", c.name, snap, err, c.want)
		}
	}
}

// Under churn the store writes at most once per Every, the newest state each time, and writes
// the last one when it stops.
func TestPersisterRateLimit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	p := newPersister(Persist{Path: path, Every: time.Hour, Version: "t"}, testLogger(t))
	ctx, stop := context.WithCancel(context.Background())
	go p.run(ctx)
	st := persistState(t)
	p.offer(st, 1)
	eventually(t, "the first state is written at once", func() bool {
		_, info, err := readPersisted(path)
		return err == nil && info.Generation == 1
	})
	before := metricValue(metricPersisted)
	for gen := uint64(2); gen <= 50; gen++ {
		p.offer(st, gen)
	}
	time.Sleep(200 * time.Millisecond)
	if _, info, _ := readPersisted(path); info.Generation != 1 || metricValue(metricPersisted) != before {
		t.Errorf("within Every the file went to generation %d (%v writes); want it left at 1", info.Generation, metricValue(metricPersisted)-before)
	}
	stop()
	<-p.done
	if _, info, err := readPersisted(path); err != nil || info.Generation != 50 {
		t.Errorf("after stop: generation %d (%v), want the newest, 50", info.Generation, err)
	}
	if n := metricValue(metricPersisted) - before; n != 1 {
		t.Errorf("%v writes for 49 states offered within Every and a stop, want 1", n)
	}
}

// FuzzLoadPersisted: whatever is in the file, LoadPersisted returns a snapshot or an error and
// never panics. Inputs starting with 'B' are taken as a body behind a valid header and checksum,
// so that the decoder itself is fuzzed and not only the checksum.
func FuzzLoadPersisted(f *testing.F) {
	good := validPersistBytes(f)
	body, err := encodeState(persistState(f))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add(append([]byte("B"), body...))
	f.Add(append([]byte("B"), body[:len(body)/3]...))
	f.Add([]byte("SLUICE-STATE 1\n{\"bodyBytes\": 99999999999}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 0 && data[0] == 'B' {
			b := data[1:]
			sum := sha256.Sum256(b)
			header := `SLUICE-STATE 1` + "\n" + `{"generation":3,"bodyBytes":` + strconv.Itoa(len(b)) + `,"bodySHA256":"` + hex.EncodeToString(sum[:]) + `"}` + "\n"
			data = append([]byte(header), b...)
		}
		path := filepath.Join(t.TempDir(), "state")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		snap, _, err := LoadPersisted(path, policy.Options{})
		if (snap == nil) == (err == nil) {
			t.Fatalf("LoadPersisted returned snapshot %v and error %v", snap, err)
		}
		if snap != nil {
			snap.Decide(webToDB(5432))
		}
	})
}

// BenchmarkPersist: what one write and one load of the state file cost at the size of the
// policy benchmarks' largest cluster (10,000 policies, 50,000 pods).
func BenchmarkPersist(b *testing.B) {
	st := clustergen.Generate(10000, 1)
	path := filepath.Join(b.TempDir(), "state")
	b.Run("write", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if err := writePersisted(path, st, PersistInfo{Generation: uint64(i)}); err != nil {
				b.Fatal(err)
			}
		}
		if fi, err := os.Stat(path); err == nil {
			b.ReportMetric(float64(fi.Size())/1e6, "MB")
		}
	})
	b.Run("load", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, _, err := LoadPersisted(path, policy.Options{Node: "node-3"}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
