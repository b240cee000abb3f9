package watch

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics of every source, labelled by source ("file" or "api"). They live in the package so
// the file and API sources report under the same names; the agent registers them once with
// RegisterMetrics on the registry its /metrics endpoint serves.
var (
	metricPropagation = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "sluice_watch_propagation_seconds",
		Help: "Time from an object change being seen (informer event or file event) to the snapshot that contains it being handed to the dataplane. Includes the debounce.",
		// 10 ms .. ~80 s: debounce is ~100 ms, compiles of large clusters take seconds.
		Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
	}, []string{"source"})
	metricCompile = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "sluice_watch_compile_seconds",
		Help:    "Time spent building one snapshot: a full compile, or a patch of the last one (see sluice_watch_builds_total).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	}, []string{"source"})
	metricBuilds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_watch_builds_total",
		Help: "Snapshots built, by kind: patch (the last snapshot patched for the changed pods, policies and namespaces) or compile (everything compiled).",
	}, []string{"source", "kind"})
	metricSnapshotSize = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_watch_snapshot_objects",
		Help: "Size of the last snapshot published, by kind (namespaces, pods, local_pods, policies, rules, invalid_policies: policies that do not compile and only isolate).",
	}, []string{"source", "kind"})
	metricLastPublish = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_watch_last_publish_timestamp_seconds",
		Help: "Unix time of the last snapshot published.",
	}, []string{"source"})
	metricErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_watch_errors_total",
		Help: "Errors by kind: load (state file unreadable or invalid; last good snapshot kept), compile, watch (list/watch against the API server failed), object (an object skipped or neutralised because it is invalid), persist (the last-known-good state file could not be written).",
	}, []string{"source", "kind"})
	metricPersisted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_watch_persisted_total",
		Help: "Writes of the last-known-good state file (at most one per persist interval, plus one at exit).",
	})
	metricLastPersist = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sluice_watch_last_persist_timestamp_seconds",
		Help: "Unix time the last-known-good state file was last written (0: never, or the store is off).",
	})
	metricStale = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_watch_stale",
		Help: "1 while the source cannot refresh its state (API server unreachable, or the state file is invalid) and the last good snapshot is kept in force; 0 otherwise.",
	}, []string{"source"})
	metricStaleSeconds = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "sluice_watch_stale_seconds",
		Help: "Seconds since the API source last knew it was in sync (0 while watches are healthy).",
	}, staleSeconds)
	metricReady = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_watch_ready",
		Help: "1 once the source has published its first complete snapshot.",
	}, []string{"source"})
)

// Collectors returns every watch metric, for registries built by hand.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{metricPropagation, metricCompile, metricBuilds, metricSnapshotSize,
		metricLastPublish, metricErrors, metricStale, metricStaleSeconds, metricReady, metricPersisted, metricLastPersist}
}

// RegisterMetrics registers the watch metrics with r. Registering twice with the same registry
// is harmless.
func RegisterMetrics(r prometheus.Registerer) error {
	for _, c := range Collectors() {
		if err := r.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return err
		}
	}
	return nil
}
