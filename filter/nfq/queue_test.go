package nfq_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/filter/nfq"
	"github.com/sluice-dev/sluice/filter/nfq/nfqtest"
	"github.com/sluice-dev/sluice/internal/netlab"
)

// These tests run the reader on real queues: a netlab lab (a node namespace routing between two
// pod namespaces), an iptables NFQUEUE rule inside the node, the reader's socket opened inside
// the node, and real traffic between the pods.

var (
	podA = netip.MustParseAddr("10.77.1.2")
	podB = netip.MustParseAddr("10.77.2.2")
)

type lab struct {
	*netlab.Lab
	a, b *netlab.Host
}

func newLab(t *testing.T) *lab {
	t.Helper()
	nfqtest.RequireLab(t)
	l := netlab.NewT(t)
	a, err := l.AddHost("pod-a", podA)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddHost("pod-b", podB)
	if err != nil {
		t.Fatal(err)
	}
	return &lab{l, a, b}
}

func (l *lab) rule(t *testing.T, args string) {
	t.Helper()
	if out, err := l.NodeExec("iptables", strings.Fields(args)...); err != nil {
		t.Fatalf("iptables %s: %v: %s", args, err, out)
	}
}

// open opens a queue inside the node namespace and closes it when the test ends.
func (l *lab) open(t *testing.T, cfg nfq.Config) *nfq.Queue {
	t.Helper()
	var q *nfq.Queue
	if err := l.Node().Do(func() (err error) { q, err = nfq.Open(cfg); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// serve runs q.Serve(h) and reports its result on the returned channel.
func serve(q *nfq.Queue, h nfq.Handler) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- q.Serve(h) }()
	return ch
}

// dstPort reads the destination port of an IPv4 TCP or UDP packet (0 if it is not one).
func dstPort(p *nfq.Packet) uint16 {
	b := p.Payload
	if len(b) < 20 || b[0]>>4 != 4 {
		return 0
	}
	ihl := int(b[0]&0xf) * 4
	if len(b) < ihl+4 || (b[9] != 6 && b[9] != 17) {
		return 0
	}
	return binary.BigEndian.Uint16(b[ihl+2:])
}

// waitFor polls cond for up to d (bounded waits, no timing assertions).
func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

func (l *lab) probe(t *testing.T, port uint16) bool {
	t.Helper()
	ok, err := l.Probe(l.a, podB, netlab.TCP, port, time.Second)
	if err != nil {
		t.Fatalf("probe port %d: %v", port, err)
	}
	return ok
}

// The handler's verdict is what the kernel does: a port the handler accepts connects, one it
// drops does not; every queued packet is counted once.
func TestVerdictsDecideRealConnections(t *testing.T) {
	l := newLab(t)
	if err := l.b.ServeAll([]netlab.Proto{netlab.TCP}, 80, 81); err != nil {
		t.Fatal(err)
	}
	l.rule(t, "-A FORWARD -p tcp -m conntrack --ctstate NEW -j NFQUEUE --queue-num 200")
	q := l.open(t, nfq.Config{Queue: 200, Flags: nfq.FlagFailOpen | nfq.FlagGSO})
	var judged, dropped atomic.Uint64
	errc := serve(q, func(p *nfq.Packet) nfq.Verdict {
		judged.Add(1)
		if p.HWProto != 0x0800 || p.Queue != 200 {
			panic(fmt.Sprintf("packet metadata: %+v", p))
		}
		if dstPort(p) == 81 {
			dropped.Add(1)
			return nfq.Drop
		}
		return nfq.Accept
	})
	for i := 0; i < 20; i++ {
		if !l.probe(t, 80) {
			t.Fatalf("connection %d to an accepted port failed", i)
		}
	}
	if l.probe(t, 81) {
		t.Fatal("a connection the handler dropped got through")
	}
	if n := judged.Load(); n < 21 {
		t.Errorf("handler saw %d packets, want at least 21 (one SYN per connection)", n)
	}
	if got, want := q.Stats().Packets.Load(), judged.Load(); got != want {
		t.Errorf("Stats.Packets %d, handler calls %d", got, want)
	}
	if dropped.Load() == 0 {
		t.Error("no SYN to port 81 reached the handler")
	}
	s := q.Stats()
	if s.Malformed.Load()+s.VerdictErrors.Load()+s.RecvErrors.Load()+s.Foreign.Load() != 0 {
		t.Errorf("errors: malformed %d verdict %d recv %d foreign %d", s.Malformed.Load(), s.VerdictErrors.Load(), s.RecvErrors.Load(), s.Foreign.Load())
	}
	q.Close()
	if err := <-errc; err != nil {
		t.Errorf("Serve after Close: %v", err)
	}
}

// ~10k packets through a real queue, receive and verdict included, cost no allocation: the
// process's mallocs (runtime.MemStats, every goroutine counted) do not grow with the packets.
func TestServeAllocatesNothingPerPacket(t *testing.T) {
	l := newLab(t)
	l.rule(t, "-A FORWARD -p udp --dport 9999 -j NFQUEUE --queue-num 201")
	for _, batch := range []int{1, 16} {
		t.Run(fmt.Sprintf("batch=%d", batch), func(t *testing.T) {
			q := l.open(t, nfq.Config{Queue: 201, Flags: nfq.FlagGSO, Batch: batch})
			var judged atomic.Uint64
			errc := serve(q, func(p *nfq.Packet) nfq.Verdict {
				if dstPort(p) != 9999 {
					return nfq.Drop
				}
				judged.Add(1)
				return nfq.Accept
			})
			sink := nfqtest.Sink(t, l.b, 9999)
			fd := nfqtest.Sender(t, l.a, podB, 9999)
			payload := make([]byte, 64)
			var sent uint64
			send := func(n int) {
				for i := 0; i < n; i++ {
					// Keep at most 512 datagrams in flight so the queue (4096) never overflows:
					// every datagram must take the round trip through the reader.
					for sent > judged.Load()+512 {
						time.Sleep(100 * time.Microsecond)
					}
					unix.Write(fd, payload)
					sent++
				}
			}
			send(500) // warm-up: the reader's thread, the scheduler, the sink
			if !waitFor(5*time.Second, func() bool { return judged.Load() >= 500 }) {
				t.Fatalf("warm-up: %d of 500 datagrams judged", judged.Load())
			}
			const n = 10000
			var before, after runtime.MemStats
			start, recv0 := judged.Load(), q.Stats().Receives.Load()
			runtime.ReadMemStats(&before)
			send(n)
			ok := waitFor(10*time.Second, func() bool { return judged.Load() >= start+n })
			runtime.ReadMemStats(&after)
			if !ok {
				t.Fatalf("%d of %d datagrams judged", judged.Load()-start, n)
			}
			mallocs := after.Mallocs - before.Mallocs
			t.Logf("%d packets in %d receives, %d mallocs in the whole process, %d datagrams reached the sink",
				n, q.Stats().Receives.Load()-recv0, mallocs, sink.Load()-start)
			// One allocation per packet would be 10000. The tolerance (1 per 100 packets)
			// leaves room for the runtime's and the test framework's own background work
			// (timers, the GC's worker start-up), two orders of magnitude below that.
			if mallocs > n/100 {
				t.Errorf("%d mallocs for %d packets (%.3f per packet)", mallocs, n, float64(mallocs)/n)
			}
			if !waitFor(5*time.Second, func() bool { return sink.Load() >= start+n }) {
				t.Errorf("sink received %d datagrams, want %d", sink.Load(), start+n)
			}
			q.Close()
			if err := <-errc; err != nil {
				t.Error(err)
			}
		})
	}
}

// FAIL_OPEN: while the reader is stuck on a packet and the queue is full, the kernel accepts the
// rest instead of dropping them. The control run without the flag shows they are dropped.
func TestFailOpenWhenQueueFull(t *testing.T) {
	l := newLab(t)
	l.rule(t, "-A FORWARD -p udp --dport 9998 -j NFQUEUE --queue-num 202")
	sink := nfqtest.Sink(t, l.b, 9998)
	fd := nfqtest.Sender(t, l.a, podB, 9998)
	for _, failOpen := range []bool{false, true} {
		t.Run(fmt.Sprintf("fail-open=%v", failOpen), func(t *testing.T) {
			var flags uint32
			if failOpen {
				flags = nfq.FlagFailOpen
			}
			q := l.open(t, nfq.Config{Queue: 202, Flags: flags, MaxQueueLen: 8, Batch: 1})
			release := make(chan struct{})
			var first atomic.Bool
			errc := serve(q, func(p *nfq.Packet) nfq.Verdict {
				if first.CompareAndSwap(false, true) {
					<-release
				}
				return nfq.Accept
			})
			base := sink.Load()
			for i := 0; i < 100; i++ {
				unix.Write(fd, make([]byte, 32))
			}
			// The reader holds the first packet: Serve is running. (Fail-open, the kernel
			// accepts the rest so fast that Close could otherwise come before Serve starts.)
			if !waitFor(3*time.Second, first.Load) {
				t.Fatal("the reader never received a packet")
			}
			passed := func() uint64 { return sink.Load() - base }
			if failOpen {
				// 100 sent, at most 8 held by the queue: the kernel accepts the rest.
				if !waitFor(3*time.Second, func() bool { return passed() >= 90 }) {
					t.Errorf("fail-open: %d of 100 datagrams passed a full queue, want >= 90", passed())
				}
			} else {
				time.Sleep(300 * time.Millisecond)
				if passed() != 0 {
					t.Errorf("fail-closed: %d datagrams passed while the reader was stuck", passed())
				}
			}
			// Fail-closed, the kernel counts what it dropped at the full queue; fail-open, what it
			// accepted instead is not a drop.
			ks := kernelStats(t, l, 202)
			if !failOpen && ks.QueueDropped < 90 {
				t.Errorf("the kernel counted %d packets over the queue length, want >= 90: %+v", ks.QueueDropped, ks)
			}
			close(release)
			// The held packets get their verdicts and go through.
			if !waitFor(3*time.Second, func() bool { return passed() >= 8 }) {
				t.Errorf("after release: %d datagrams passed", passed())
			}
			q.Close()
			if err := <-errc; err != nil {
				t.Error(err)
			}
		})
	}
}

func kernelStats(t *testing.T, l *lab, queue uint16) nfq.KernelStats {
	t.Helper()
	var all []nfq.KernelStats
	if err := l.Node().Do(func() (err error) { all, err = nfq.ReadKernelStats(); return err }); err != nil {
		t.Fatal(err)
	}
	for _, s := range all {
		if s.Queue == queue {
			return s
		}
	}
	t.Fatalf("queue %d is not bound (kernel: %+v)", queue, all)
	return nfq.KernelStats{}
}

// --queue-bypass: with no reader bound (never started, or closed), the kernel accepts; without
// the bypass the same packets are dropped. Close really unbinds: traffic bypasses right after.
func TestBypassWithoutReader(t *testing.T) {
	l := newLab(t)
	if err := l.b.ServeAll([]netlab.Proto{netlab.TCP}, 80, 81); err != nil {
		t.Fatal(err)
	}
	l.rule(t, "-A FORWARD -p tcp --dport 80 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 203 --queue-bypass")
	l.rule(t, "-A FORWARD -p tcp --dport 81 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 204")
	if !l.probe(t, 80) {
		t.Error("no reader, --queue-bypass: the connection was dropped")
	}
	if l.probe(t, 81) {
		t.Error("no reader, no bypass: the connection got through (the control must fail)")
	}
	q := l.open(t, nfq.Config{Queue: 203})
	var judged atomic.Uint64
	errc := serve(q, func(*nfq.Packet) nfq.Verdict { judged.Add(1); return nfq.Drop })
	if l.probe(t, 80) {
		t.Error("reader bound and dropping: the connection got through")
	}
	if judged.Load() == 0 {
		t.Error("the bound reader saw no packet")
	}
	q.Close()
	if err := <-errc; err != nil {
		t.Error(err)
	}
	if !l.probe(t, 80) {
		t.Error("after Close: the connection did not bypass the unbound queue")
	}
}

// GSO: with the flag the kernel hands over GSO super-packets whole (one verdict for many
// segments, marked in SkbInfo, with their full length in CapLen); without it, it segments them
// first and no queued packet is longer than the MTU. Locally sent TCP (the node's OUTPUT) is
// GSO on a veth.
func TestGSO(t *testing.T) {
	l := newLab(t)
	var ln net.Listener
	if err := l.b.Do(func() (err error) { ln, err = net.Listen("tcp4", ":5001"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The transfers run one after the other: one reader drains them in turn.
	go func() {
		for c, err := ln.Accept(); err == nil; c, err = ln.Accept() {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	l.rule(t, "-A OUTPUT -p tcp --dport 5001 -j NFQUEUE --queue-num 205")
	for _, gso := range []bool{false, true} {
		t.Run(fmt.Sprintf("gso=%v", gso), func(t *testing.T) {
			var flags uint32
			if gso {
				flags = nfq.FlagGSO
			}
			q := l.open(t, nfq.Config{Queue: 205, Flags: flags})
			var big, marked, total atomic.Uint64
			errc := serve(q, func(p *nfq.Packet) nfq.Verdict {
				total.Add(1)
				if p.CapLen > 1500 {
					big.Add(1)
				}
				if p.SkbInfo&nfq.SkbGSO != 0 {
					marked.Add(1)
				}
				return nfq.Accept
			})
			var c net.Conn
			if err := l.Node().Do(func() (err error) {
				c, err = net.DialTimeout("tcp4", netip.AddrPortFrom(podB, 5001).String(), 3*time.Second)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			chunk := make([]byte, 64<<10)
			for i := 0; i < 64; i++ { // 4 MiB
				if _, err := c.Write(chunk); err != nil {
					t.Fatal(err)
				}
			}
			c.Close()
			q.Close()
			if err := <-errc; err != nil {
				t.Error(err)
			}
			t.Logf("gso=%v: %d packets queued, %d longer than 1500 bytes, %d marked GSO", gso, total.Load(), big.Load(), marked.Load())
			if gso && (big.Load() == 0 || marked.Load() == 0) {
				t.Errorf("with the GSO flag no super-packet was queued whole (%d long, %d marked)", big.Load(), marked.Load())
			}
			if !gso && (big.Load() != 0 || marked.Load() != 0) {
				t.Errorf("without the GSO flag the kernel queued %d long and %d GSO-marked packets", big.Load(), marked.Load())
			}
		})
	}
}

// Overruns: a reader too slow for a burst overflows its socket buffer. With ReportENOBUFS the
// overrun reaches the reader and is counted; with NETLINK_NO_ENOBUFS (the default) the reader
// sees no error, and the kernel's own counter (user_dropped) shows the loss instead.
func TestOverrunsAreCounted(t *testing.T) {
	l := newLab(t)
	l.rule(t, "-A FORWARD -p udp --dport 9997 -j NFQUEUE --queue-num 206")
	// A listener, so that no ICMP port unreachable makes the connected sender's next write fail.
	nfqtest.Sink(t, l.b, 9997)
	fd := nfqtest.Sender(t, l.a, podB, 9997)
	for _, report := range []bool{true, false} {
		t.Run(fmt.Sprintf("report=%v", report), func(t *testing.T) {
			q := l.open(t, nfq.Config{Queue: 206, ReportENOBUFS: report, ReadBuffer: 16 << 10, Batch: 1})
			release := make(chan struct{})
			var first atomic.Bool
			errc := serve(q, func(*nfq.Packet) nfq.Verdict {
				if first.CompareAndSwap(false, true) {
					<-release
				}
				return nfq.Accept
			})
			for i := 0; i < 1000; i++ {
				unix.Write(fd, make([]byte, 32))
			}
			time.Sleep(100 * time.Millisecond)
			ks := kernelStats(t, l, 206)
			close(release)
			if report {
				if !waitFor(3*time.Second, func() bool { return q.Stats().ENOBUFS.Load() > 0 }) {
					t.Errorf("no ENOBUFS counted after a 1000-packet burst into a 16 KiB buffer (kernel: %+v)", ks)
				}
			} else if n := q.Stats().ENOBUFS.Load(); n != 0 {
				t.Errorf("NETLINK_NO_ENOBUFS is set but %d overruns were reported", n)
			}
			if ks.UserDropped == 0 {
				t.Errorf("the kernel counted no packet the socket could not take: %+v", ks)
			}
			// The reader goes on serving after an overrun.
			n0 := q.Stats().Packets.Load()
			if _, err := unix.Write(fd, make([]byte, 32)); err != nil {
				t.Fatal(err)
			}
			if !waitFor(3*time.Second, func() bool { return q.Stats().Packets.Load() > n0 }) {
				s := q.Stats()
				t.Errorf("no packet served after the overrun: %d packets, %d receives, %d ENOBUFS, %d receive errors; kernel before %+v, now %+v",
					s.Packets.Load(), s.Receives.Load(), s.ENOBUFS.Load(), s.RecvErrors.Load(), ks, kernelStats(t, l, 206))
			}
			q.Close()
			if err := <-errc; err != nil {
				t.Error(err)
			}
		})
	}
}

// Several queues, each on its own socket and reader, in one process.
func TestMultiQueue(t *testing.T) {
	l := newLab(t)
	if err := l.b.ServeAll([]netlab.Proto{netlab.TCP}, 80, 81); err != nil {
		t.Fatal(err)
	}
	l.rule(t, "-A FORWARD -p tcp --dport 80 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 210")
	l.rule(t, "-A FORWARD -p tcp --dport 81 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 211")
	var seen [2]atomic.Uint64
	var wrong atomic.Uint64
	for i := range 2 {
		q := l.open(t, nfq.Config{Queue: uint16(210 + i), Flags: nfq.FlagFailOpen})
		serve(q, func(p *nfq.Packet) nfq.Verdict {
			if p.Queue != uint16(210+i) || dstPort(p) != uint16(80+i) {
				wrong.Add(1)
			}
			seen[i].Add(1)
			return nfq.Accept
		})
	}
	for i := 0; i < 5; i++ {
		if !l.probe(t, 80) || !l.probe(t, 81) {
			t.Fatal("a connection through one of the queues failed")
		}
	}
	if seen[0].Load() < 5 || seen[1].Load() < 5 || wrong.Load() != 0 {
		t.Errorf("queue 210 saw %d, queue 211 saw %d, %d on the wrong queue", seen[0].Load(), seen[1].Load(), wrong.Load())
	}
}

// A queue bound by one reader cannot be taken by another (the error says what to do); Close
// stops a reader blocked in its receive and releases the queue for the next one.
func TestBindConflictAndCleanStop(t *testing.T) {
	l := newLab(t)
	q := l.open(t, nfq.Config{Queue: 220, StopLatency: 50 * time.Millisecond})
	err := l.Node().Do(func() error {
		q2, err := nfq.Open(nfq.Config{Queue: 220})
		if err == nil {
			q2.Close()
		}
		return err
	})
	// The kernel answers EPERM (the queue belongs to another socket) before it would say EBUSY.
	if err == nil || !(errors.Is(err, unix.EPERM) || errors.Is(err, unix.EBUSY)) || !strings.Contains(err.Error(), "another agent") {
		t.Fatalf("second bind of queue 220: %v, want EPERM or EBUSY naming another agent", err)
	}
	errc := serve(q, func(*nfq.Packet) nfq.Verdict { return nfq.Accept })
	time.Sleep(20 * time.Millisecond) // let it block in its receive
	closed := make(chan error, 1)
	go func() { closed <- q.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return within 5s")
	}
	if err := <-errc; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if err := q.Serve(func(*nfq.Packet) nfq.Verdict { return nfq.Accept }); err == nil {
		t.Error("Serve on a closed queue returned nil")
	}
	if err := q.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	// The kernel released the queue: it is gone from its table and can be bound again.
	var all []nfq.KernelStats
	l.Node().Do(func() (err error) { all, err = nfq.ReadKernelStats(); return err })
	for _, s := range all {
		if s.Queue == 220 {
			t.Errorf("queue 220 still bound after Close: %+v", s)
		}
	}
	l.open(t, nfq.Config{Queue: 220})
}

// A verdict can set the packet's mark: NF_REPEAT with a mark bit runs the hook again, where
// rules matching the bit apply (here one that drops port 81), and the packet is not queued a
// second time.
func TestRepeatWithMark(t *testing.T) {
	l := newLab(t)
	if err := l.b.ServeAll([]netlab.Proto{netlab.TCP}, 80, 81); err != nil {
		t.Fatal(err)
	}
	l.rule(t, "-A FORWARD -m mark --mark 0x100/0x100 -p tcp --dport 81 -j DROP")
	l.rule(t, "-A FORWARD -m mark --mark 0x100/0x100 -j ACCEPT")
	l.rule(t, "-A FORWARD -p tcp -m conntrack --ctstate NEW -j NFQUEUE --queue-num 230")
	q := l.open(t, nfq.Config{Queue: 230})
	var judged, marked atomic.Uint64
	serve(q, func(p *nfq.Packet) nfq.Verdict {
		judged.Add(1)
		if p.Mark&0x100 != 0 {
			marked.Add(1) // a packet already judged came back: the mark did not stick
		}
		p.SetMark(p.Mark | 0x100)
		return nfq.Repeat
	})
	for i := 0; i < 5; i++ {
		if !l.probe(t, 80) {
			t.Fatal("port 80: the repeated, marked SYN did not get through")
		}
	}
	if l.probe(t, 81) {
		t.Error("port 81: the rule after the verdict (mark and port 81: DROP) did not apply")
	}
	if n := judged.Load(); n < 6 || n > 8 || marked.Load() != 0 {
		t.Errorf("handler saw %d packets (%d already marked) for 6 connections", n, marked.Load())
	}
}
