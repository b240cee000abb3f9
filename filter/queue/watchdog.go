package queue

import (
	"context"
	"fmt"
	"os"
	"time"
)

const watchdogTick = 500 * time.Millisecond

// watchdog watches the queue workers. A stuck agent black-holes the packets queued to it even
// with --queue-bypass (bypass applies only when no reader is bound), so a worker that holds
// packets without progress for Stall makes /healthz fail (the kubelet's liveness probe), and
// after Exit the agent exits so that its supervisor restarts it: a dead agent fails open or
// closed as configured, which a stuck one does not.
//
// A worker is stuck when it has been inside one packet for Stall, or when its queue has had
// packets waiting for Stall without a single verdict. If the watchdog itself did not run for a
// while (the whole process was stopped, SIGSTOP, or starved), it restarts its clocks: the
// workers had no chance either, and resuming must not be mistaken for a stall.
func (q *Queues) watchdog(ctx context.Context) {
	t := time.NewTicker(watchdogTick)
	defer t.Stop()
	last := time.Now().UnixNano()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		if now-last > int64(3*watchdogTick) {
			for _, w := range q.workers {
				w.waitSince, w.stallSince = 0, 0
			}
		}
		last = now
		stats, err := Stats()
		if err != nil {
			q.log.Warn("watchdog cannot read queue stats", "err", err)
		}
		waiting := map[uint16]uint64{}
		for _, st := range stats {
			waiting[st.Queue] = st.Waiting
		}
		q.check(now, waiting)
	}
}

// check evaluates every worker at time now given the packets waiting per queue, updates
// health, and calls OnStuck (default: exit) for a worker stuck for Exit.
func (q *Queues) check(now int64, waiting map[uint16]uint64) {
	stall, exit := int64(q.cfg.Stall), int64(q.cfg.Exit)
	var why string
	stuck := 0
	for _, w := range q.workers {
		progress := w.progress.Load()
		busy := w.busySince.Load()
		if waiting[w.queue] > 0 {
			if w.waitSince == 0 || progress != w.seenProgress {
				w.waitSince, w.seenProgress = now, progress
			}
		} else {
			w.waitSince = 0
		}
		var since int64
		switch {
		case busy != 0 && now-busy >= stall:
			since = busy
		case w.waitSince != 0 && now-w.waitSince >= stall:
			since = w.waitSince
		}
		if since == 0 {
			w.stallSince = 0
			continue
		}
		if w.stallSince == 0 {
			w.stallSince = since
			q.log.Error("queue worker stuck: packets are waiting and no verdict is given",
				"queue", w.queue, "waiting", waiting[w.queue], "for", time.Duration(now-since).String())
		}
		stuck++
		why = fmt.Sprintf("queue %d worker stuck for %s with %d packets waiting", w.queue,
			time.Duration(now-w.stallSince).Round(time.Millisecond), waiting[w.queue])
		if now-w.stallSince >= exit {
			q.log.Error("queue worker stuck too long; exiting so that the supervisor restarts the agent",
				"queue", w.queue)
			if q.cfg.OnStuck != nil {
				q.cfg.OnStuck()
			} else {
				os.Exit(3)
			}
		}
	}
	q.m.stalled.Set(float64(stuck))
	if stuck == 0 {
		q.unhealthy.Store(nil)
	} else {
		q.unhealthy.Store(&why)
	}
}
