// Package watch produces policy snapshots from the cluster's state: from the API server through
// client-go informers (APISource) or from a YAML state file (FileSource). Both hand each new
// snapshot to one publish callback, so everything after it (the dataplane's atomic swap, flow
// caches keyed by generation) is the same in cluster mode and file mode.
package watch

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/sluice-dev/sluice/policy"
)

// Source produces snapshots. Run publishes the first snapshot as soon as it has complete state,
// then a new one (with a higher generation) after every change, until ctx is done. publish is
// called from one goroutine at a time and must not block for long; the snapshot it receives is
// immutable and stays valid forever.
type Source interface {
	Run(ctx context.Context, publish func(*policy.Snapshot)) error
}

// staleSinceNanos is when the API source last lost its watch (unix nanoseconds), 0 while in sync.
// One agent runs one API source, so a package variable feeds the sluice_watch_stale_seconds gauge.
var staleSinceNanos atomic.Int64

func staleSeconds() float64 {
	t := staleSinceNanos.Load()
	if t == 0 {
		return 0
	}
	return time.Since(time.Unix(0, t)).Seconds()
}

// publisher numbers the snapshots of one source (generations without gaps, always increasing)
// and records each one handed to the dataplane in the metrics common to both sources.
type publisher struct {
	source string
	opt    policy.Options
	gen    uint64
	log    *slog.Logger
}

func newPublisher(source string, opt policy.Options, log *slog.Logger) *publisher {
	if log == nil {
		log = slog.Default()
	}
	return &publisher{source: source, opt: opt, gen: opt.Generation, log: log}
}

// build builds the next generation from a Builder's objects: it patches the last snapshot when
// it can. The generation is consumed only when a snapshot comes back, so the published
// generations have no gaps and always increase. With Options.IsolateInvalid that snapshot may
// come with the *policy.CompileError of the policies it isolates.
func (p *publisher) build(b *policy.Builder) (*policy.Snapshot, error) {
	gen := p.gen + 1
	start := time.Now()
	patched, _ := b.Builds()
	snap, err := b.Build(gen)
	metricCompile.WithLabelValues(p.source).Observe(time.Since(start).Seconds())
	if now, _ := b.Builds(); now > patched {
		metricBuilds.WithLabelValues(p.source, "patch").Inc()
	} else {
		metricBuilds.WithLabelValues(p.source, "compile").Inc()
	}
	if snap == nil {
		metricErrors.WithLabelValues(p.source, "compile").Inc()
		return nil, err
	}
	p.gen = gen
	return snap, err
}

// published records a snapshot handed to the dataplane; changedAt is when the oldest change it
// contains was seen (zero when unknown).
func (p *publisher) published(snap *policy.Snapshot, changedAt time.Time) {
	now := time.Now()
	if !changedAt.IsZero() {
		metricPropagation.WithLabelValues(p.source).Observe(now.Sub(changedAt).Seconds())
	}
	st := snap.Stats()
	metricLastPublish.WithLabelValues(p.source).Set(float64(now.UnixNano()) / 1e9)
	metricSnapshotSize.WithLabelValues(p.source, "namespaces").Set(float64(st.Namespaces))
	metricSnapshotSize.WithLabelValues(p.source, "pods").Set(float64(st.Pods))
	metricSnapshotSize.WithLabelValues(p.source, "local_pods").Set(float64(st.LocalPods))
	metricSnapshotSize.WithLabelValues(p.source, "policies").Set(float64(st.Policies))
	metricSnapshotSize.WithLabelValues(p.source, "rules").Set(float64(st.Rules))
	metricSnapshotSize.WithLabelValues(p.source, "invalid_policies").Set(float64(st.Invalid))
	metricReady.WithLabelValues(p.source).Set(1)
	// Debug: the dataplane logs the snapshot it puts in force ("policy snapshot in use").
	p.log.Debug("snapshot published", "generation", snap.Generation(),
		"namespaces", st.Namespaces, "pods", st.Pods, "local_pods", st.LocalPods,
		"policies", st.Policies, "rules", st.Rules, "invalid_policies", st.Invalid)
}
