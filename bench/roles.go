package main

// The harness re-executes its own binary under `ip netns exec NS` for every process that must
// live in a lab namespace: the server pod, the load generator in the client pod and the bare
// NFQUEUE loop in the node. Separate processes keep their CPU, GC and scheduler apart, as the
// agent's is, so no configuration gets an unfair share of the two cores.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/filter/nfq"
)

const roleArg = "__role"

// runRole runs a sub-process role when argv says so; it reports whether it did.
func runRole(args []string) bool {
	if len(args) < 2 || args[0] != roleArg {
		return false
	}
	var err error
	switch args[1] {
	case "server":
		err = roleServer(args[2:])
	case "load":
		err = roleLoad(args[2:])
	case "bare":
		err = roleBare(args[2:])
	case "bare-nfq":
		err = roleBareNfq(args[2:])
	default:
		err = fmt.Errorf("unknown role %q", args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench role", args[1]+":", err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

// roleServer accepts TCP connections and counts UDP datagrams until stdin closes. Each line on
// stdin is answered with one JSON line of counters, so the parent reads the UDP count before and
// after a run without restarting the server.
func roleServer(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	tcpAddr := fs.String("tcp", "", "ip:port to accept TCP on")
	udpAddr := fs.String("udp", "", "ip:port to count UDP on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var accepted, udp atomic.Uint64
	if *tcpAddr != "" {
		ap, err := netip.ParseAddrPort(*tcpAddr)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, sockaddr(ap)); err != nil {
			return fmt.Errorf("bind %s: %w", ap, err)
		}
		if err := unix.Listen(fd, 4096); err != nil {
			return err
		}
		// Blocking accept on dedicated threads: cheaper than the netpoller for a tight loop.
		for i := 0; i < 2; i++ {
			go func() {
				for {
					c, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
					if err != nil {
						if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
							continue
						}
						return
					}
					accepted.Add(1)
					unix.Close(c)
				}
			}()
		}
	}
	if *udpAddr != "" {
		ap, err := netip.ParseAddrPort(*udpAddr)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
		if err := unix.Bind(fd, sockaddr(ap)); err != nil {
			return fmt.Errorf("bind %s: %w", ap, err)
		}
		go func() {
			buf := make([]byte, 2048)
			for {
				_, _, err := unix.Recvfrom(fd, buf, 0)
				if err != nil {
					if errors.Is(err, unix.EINTR) {
						continue
					}
					return
				}
				udp.Add(1)
			}
		}()
	}
	fmt.Println(`{"ready":true}`)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		fmt.Printf(`{"accepted":%d,"udp":%d}`+"\n", accepted.Load(), udp.Load())
	}
	return nil
}

// loadResult is what one load-generator run reports.
type loadResult struct {
	Mode     string  `json:"mode"`
	Clients  int     `json:"clients"`
	Elapsed  float64 `json:"elapsed_s"`
	Done     uint64  `json:"done"` // connections completed (tcp) or datagrams sent (udp)
	Errors   uint64  `json:"errors"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	FirstErr string  `json:"first_error,omitempty"`
	// Hist counts connect() times in geometric buckets (latBucket), so the parent can merge
	// the load generators of several pods before taking quantiles.
	Hist []uint64 `json:"hist,omitempty"`
}

const (
	latBuckets = 400
	latFactor  = 1.05 // 5 % wide buckets from 1 µs: quantiles within ±2.5 %
)

func latBucket(d time.Duration) int {
	us := float64(d) / 1e3
	if us <= 1 {
		return 0
	}
	return min(latBuckets-1, int(math.Log(us)/math.Log(latFactor)))
}

// histQuantile returns the q-quantile in µs (the bucket's geometric middle).
func histQuantile(h []uint64, q float64) float64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	if n == 0 {
		return 0
	}
	target := uint64(math.Ceil(q * float64(n)))
	var acc uint64
	for i, c := range h {
		acc += c
		if acc >= max(target, 1) {
			return math.Pow(latFactor, float64(i)+0.5)
		}
	}
	return math.Pow(latFactor, float64(len(h)))
}

// roleLoad opens TCP connections (connect, then close with RST through SO_LINGER 0 so neither
// side keeps TIME_WAIT and the ephemeral ports never run out) or sends UDP datagrams, from
// `clients` threads, until the duration or the count cap is reached.
func roleLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	mode := fs.String("mode", "tcp", "tcp or udp")
	addr := fs.String("addr", "", "server ip:port")
	clients := fs.Int("clients", 1, "concurrent clients")
	dur := fs.Duration("duration", 2*time.Second, "how long to run")
	maxN := fs.Uint64("max", 2_000_000, "stop after this many connections or datagrams")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*addr)
	if err != nil {
		return err
	}
	sa := sockaddr(ap)
	var done, errs atomic.Uint64
	var firstErr atomic.Value
	lat := make([][]time.Duration, *clients)
	start := time.Now()
	deadline := start.Add(*dur)
	var wg sync.WaitGroup
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if *mode == "udp" {
				udpClient(sa, deadline, *maxN, &done, &errs, &firstErr)
				return
			}
			lat[i] = make([]time.Duration, 0, 1<<16)
			for time.Now().Before(deadline) && done.Load() < *maxN {
				t0 := time.Now()
				err := tcpConnect(sa)
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				lat[i] = append(lat[i], time.Since(t0))
				done.Add(1)
			}
		}(i)
	}
	wg.Wait()
	res := loadResult{Mode: *mode, Clients: *clients, Elapsed: time.Since(start).Seconds(), Done: done.Load(), Errors: errs.Load()}
	if fe, ok := firstErr.Load().(string); ok {
		res.FirstErr = fe
	}
	if *mode == "tcp" {
		res.Hist = make([]uint64, latBuckets)
		for _, l := range lat {
			for _, d := range l {
				res.Hist[latBucket(d)]++
			}
		}
		res.P50us, res.P99us = histQuantile(res.Hist, 0.5), histQuantile(res.Hist, 0.99)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func tcpConnect(sa unix.Sockaddr) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	// A dropped SYN would otherwise block for the kernel's full retry schedule.
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 1})
	for {
		err = unix.Connect(fd, sa)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

func udpClient(sa unix.Sockaddr, deadline time.Time, maxN uint64, done, errs *atomic.Uint64, firstErr *atomic.Value) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		errs.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
		return
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		errs.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
		return
	}
	payload := make([]byte, 64)
	for n := 0; ; n++ {
		// Reading the clock every packet would cost more than the send.
		if n%64 == 0 && (time.Now().After(deadline) || done.Load() >= maxN) {
			return
		}
		if _, err := unix.Write(fd, payload); err != nil {
			errs.Add(1)
			firstErr.CompareAndSwap(nil, err.Error())
			continue
		}
		done.Add(1)
	}
}

// roleBare is the physical limit of the approach: read every queued packet and accept it, with
// the same copy mode (headers) a real enforcer needs, and nothing else.
func roleBare(args []string) error {
	fs := flag.NewFlagSet("bare", flag.ContinueOnError)
	first := fs.Uint("queue-num", 100, "first queue number")
	queues := fs.Uint("queues", 1, "number of queues")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	var seen atomic.Uint64
	for i := uint(0); i < *queues; i++ {
		q, err := nfqueue.Open(&nfqueue.Config{NfQueue: uint16(*first + i), MaxPacketLen: 128,
			MaxQueueLen: 4096, Copymode: nfqueue.NfQnlCopyPacket, WriteTimeout: time.Second})
		if err != nil {
			return fmt.Errorf("open queue %d: %w", *first+i, err)
		}
		defer q.Close()
		// ENOBUFS when the socket overruns is not fatal for a loop that only accepts.
		q.SetOption(netlink.NoENOBUFS, true)
		err = q.RegisterWithErrorFunc(ctx, func(a nfqueue.Attribute) int {
			seen.Add(1)
			q.SetVerdict(*a.PacketID, nfqueue.NfAccept)
			return 0
		}, func(error) int { return 0 })
		if err != nil {
			return fmt.Errorf("register queue %d: %w", *first+i, err)
		}
	}
	fmt.Println(`{"ready":true}`)
	<-ctx.Done()
	fmt.Fprintf(os.Stderr, "bare loop: %d packets\n", seen.Load())
	return nil
}

// roleBareNfq is the bare accept-all loop over sluice's own reader (filter/nfq), configured as
// the agent configures its queues (160-byte copy, GSO, FAIL_OPEN): the reader's own floor, to
// set beside the C loop's and go-nfqueue's.
func roleBareNfq(args []string) error {
	fs := flag.NewFlagSet("bare-nfq", flag.ContinueOnError)
	first := fs.Uint("queue-num", 100, "first queue number")
	queues := fs.Uint("queues", 1, "number of queues")
	batch := fs.Int("batch", 16, "messages per receive (1: one recvmsg per packet)")
	batchVerdict := fs.Bool("batch-verdict", false, "one NFQNL_MSG_VERDICT_BATCH for packets read together")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	var qs []*nfq.Queue
	errs := make(chan error, *queues)
	for i := uint(0); i < *queues; i++ {
		q, err := nfq.Open(nfq.Config{Queue: uint16(*first + i), Flags: nfq.FlagFailOpen | nfq.FlagGSO,
			Batch: *batch, BatchVerdict: *batchVerdict})
		if err != nil {
			return err
		}
		defer q.Close()
		qs = append(qs, q)
		go func() { errs <- q.Serve(func(*nfq.Packet) nfq.Verdict { return nfq.Accept }) }()
	}
	fmt.Println(`{"ready":true}`)
	select {
	case <-ctx.Done():
	case err := <-errs:
		return err
	}
	var seen, recvs uint64
	for _, q := range qs {
		q.Close()
		seen += q.Stats().Packets.Load()
		recvs += q.Stats().Receives.Load()
	}
	fmt.Fprintf(os.Stderr, "bare nfq loop: %d packets in %d receives\n", seen, recvs)
	return nil
}
