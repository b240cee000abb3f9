package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluice-dev/sluice/filter"
)

// serveProbes exposes /metrics, /healthz and /readyz on addr until ctx ends. health and ready
// return nil when fine, or the reason they are not (the probe's body).
func serveProbes(ctx context.Context, addr string, reg *prometheus.Registry, health, ready func() error) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	probe := func(f func() error) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if err := f(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		}
	}
	mux.Handle("/healthz", probe(health))
	mux.Handle("/readyz", probe(ready))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener on %s: %w (choose another --metrics-addr)", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// packetCollector exports the packet path's counters (filter.Engine.Counters) at scrape time.
type packetCollector struct{ e *filter.Engine }

func newPacketCollector(e *filter.Engine) prometheus.Collector { return packetCollector{e} }

var (
	descPackets    = prometheus.NewDesc("sluice_packets_total", "Queued packets by verdict (accept, drop, audit-drop) and reason.", []string{"verdict", "reason"}, nil)
	descLatency    = prometheus.NewDesc("sluice_decision_seconds", "User-space decision time per queued packet: decode, flow cache, policy, counters (the verdict syscall excluded).", nil, nil)
	descCacheHits  = prometheus.NewDesc("sluice_flow_cache_hits_total", "Verdicts answered by a worker's flow cache.", nil, nil)
	descCacheMiss  = prometheus.NewDesc("sluice_flow_cache_misses_total", "Verdicts computed from the policy snapshot.", nil, nil)
	descLogDropped = prometheus.NewDesc("sluice_log_lines_dropped_total", "Verdict log lines dropped because the log writer fell behind.", nil, nil)
	descGeneration = prometheus.NewDesc("sluice_snapshot_generation", "Generation of the policy snapshot in force.", nil, nil)
	descSnapshots  = prometheus.NewDesc("sluice_snapshots_total", "Policy snapshots put in force.", nil, nil)
	descEvicted    = prometheus.NewDesc("sluice_conn_table_evicted_total", "Live connections pushed out of sluice's connection table by others' (a full bucket).", nil, nil)
	descRefused    = prometheus.NewDesc("sluice_conn_table_refused_total", "Accepted openings not recorded in sluice's connection table: their opener was over its quota.", nil, nil)
)

func (packetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descLatency, descCacheHits, descCacheMiss, descLogDropped, descGeneration, descSnapshots, descEvicted, descRefused} {
		ch <- d
	}
}

func (c packetCollector) Collect(ch chan<- prometheus.Metric) {
	n := c.e.Counters()
	n.EachPacket(func(v filter.Verdict, r filter.Reason, count uint64) {
		ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(count), v.String(), r.String())
	})
	buckets := make(map[float64]uint64, len(filter.LatencyBuckets))
	var cum, total uint64
	for i, b := range filter.LatencyBuckets {
		cum += n.Latency[i]
		buckets[b.Seconds()] = cum
	}
	for _, x := range n.Latency {
		total += x
	}
	ch <- prometheus.MustNewConstHistogram(descLatency, total, n.LatencySum.Seconds(), buckets)
	ch <- prometheus.MustNewConstMetric(descCacheHits, prometheus.CounterValue, float64(n.CacheHits))
	ch <- prometheus.MustNewConstMetric(descCacheMiss, prometheus.CounterValue, float64(n.CacheMisses))
	ch <- prometheus.MustNewConstMetric(descLogDropped, prometheus.CounterValue, float64(n.LogDropped))
	ch <- prometheus.MustNewConstMetric(descGeneration, prometheus.GaugeValue, float64(n.Generation))
	ch <- prometheus.MustNewConstMetric(descSnapshots, prometheus.CounterValue, float64(n.Snapshots))
	ch <- prometheus.MustNewConstMetric(descEvicted, prometheus.CounterValue, float64(n.TableEvicted))
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(n.TableRefused))
}
