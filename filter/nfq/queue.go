package nfq

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Config describes one queue.
type Config struct {
	Queue uint16
	// CopyRange is how many bytes of each packet the kernel copies (default 160: every header
	// sluice reads, no payload).
	CopyRange uint32
	// MaxQueueLen is how many packets may wait for a verdict (default 4096).
	MaxQueueLen uint32
	// Flags are FlagFailOpen, FlagGSO.
	Flags uint32
	// ReadBuffer is the socket's receive buffer in bytes (default 4 MiB): a burst waits there
	// instead of overrunning. Set with SO_RCVBUFFORCE, so it is not capped by rmem_max.
	ReadBuffer int
	// ReportENOBUFS turns NETLINK_NO_ENOBUFS off: an overrun of the socket buffer is then
	// reported to the reader (counted in Stats.ENOBUFS) instead of being silent. Either way the
	// kernel counts the packets it could not deliver (KernelStats) and, with FlagFailOpen,
	// accepts them.
	ReportENOBUFS bool
	// Batch is how many messages one receive may take (recvmmsg with MSG_WAITFORONE): under
	// load several packets are read with one system call, and their verdicts leave in one
	// write. 1 reads one message per call. Default 16.
	Batch int
	// BatchVerdict sends one NFQNL_MSG_VERDICT_BATCH for packets read together that all got the
	// same verdict, instead of one verdict message each (in one write either way).
	BatchVerdict bool
	// StopLatency bounds how long Close waits for a blocked receive to notice (it is the
	// socket's receive timeout; default 100 ms). Idle readers wake this often.
	StopLatency time.Duration
	// OnError is told about receive and send errors other than overruns (from the reader's
	// thread; it should not block). nil ignores them; they are counted either way.
	OnError func(error)
}

// Stats are a queue's counters. They are updated by the reader and safe to read at any time.
type Stats struct {
	Packets       atomic.Uint64 // packet messages handed to the handler
	Receives      atomic.Uint64 // receive calls that returned messages
	Malformed     atomic.Uint64 // messages that could not be decoded (no verdict possible)
	Truncated     atomic.Uint64 // messages larger than the receive buffer
	Foreign       atomic.Uint64 // messages from a sender other than the kernel (ignored)
	ENOBUFS       atomic.Uint64 // socket overruns reported to us (ReportENOBUFS)
	RecvErrors    atomic.Uint64 // other receive errors
	VerdictErrors atomic.Uint64 // verdict writes that failed, and errors the kernel sent back
}

// Handler judges one packet. It runs on the reader's locked OS thread and must not keep p or
// p.Payload after it returns.
type Handler func(p *Packet) Verdict

// Queue is one bound NFQUEUE queue on its own netlink socket.
type Queue struct {
	cfg   Config
	fd    int
	stats Stats

	mu      sync.Mutex
	state   int // idle, serving, closed
	served  chan struct{}
	closing atomic.Bool

	// Reader-only state, allocated once.
	bufs  [][]byte
	iov   []unix.Iovec
	names []unix.RawSockaddrNetlink
	hdrs  []mmsghdr
	vbuf  []byte
	pkt   Packet
}

const (
	stIdle = iota
	stServing
	stClosed
)

// mmsghdr is struct mmsghdr; Go pads it to the kernel's layout on every ABI.
type mmsghdr struct {
	Hdr unix.Msghdr
	Len uint32
}

// Open creates the socket in the calling thread's network namespace, binds cfg.Queue and
// configures it. The queue is served once Serve runs; until then packets wait in the kernel (up
// to MaxQueueLen, then FAIL_OPEN decides).
func Open(cfg Config) (*Queue, error) {
	if cfg.CopyRange == 0 {
		cfg.CopyRange = 160
	}
	if cfg.CopyRange > 0xffff {
		return nil, fmt.Errorf("copy range %d is larger than a packet can be (65535)", cfg.CopyRange)
	}
	if cfg.MaxQueueLen == 0 {
		cfg.MaxQueueLen = 4096
	}
	if cfg.ReadBuffer == 0 {
		cfg.ReadBuffer = 4 << 20
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 16
	}
	if cfg.Batch > 1024 {
		return nil, fmt.Errorf("batch %d is too large (at most 1024 messages per receive)", cfg.Batch)
	}
	if cfg.StopLatency <= 0 {
		cfg.StopLatency = 100 * time.Millisecond
	}
	if cfg.Flags&^(FlagFailOpen|FlagGSO|FlagConntrack) != 0 {
		return nil, fmt.Errorf("unknown queue flags %#x", cfg.Flags)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("NFQUEUE %d: netlink socket: %w (needs root or CAP_NET_ADMIN)", cfg.Queue, err)
	}
	q := &Queue{cfg: cfg, fd: fd, served: make(chan struct{})}
	if err := q.setup(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	q.alloc()
	return q, nil
}

func (q *Queue) setup() error {
	if err := unix.Bind(q.fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("NFQUEUE %d: bind the netlink socket: %w", q.cfg.Queue, err)
	}
	if err := unix.SetsockoptInt(q.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, q.cfg.ReadBuffer); err != nil {
		if err := unix.SetsockoptInt(q.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, q.cfg.ReadBuffer); err != nil {
			return fmt.Errorf("NFQUEUE %d: set the receive buffer to %d bytes: %w", q.cfg.Queue, q.cfg.ReadBuffer, err)
		}
	}
	if !q.cfg.ReportENOBUFS {
		if err := unix.SetsockoptInt(q.fd, unix.SOL_NETLINK, unix.NETLINK_NO_ENOBUFS, 1); err != nil {
			return fmt.Errorf("NFQUEUE %d: set NETLINK_NO_ENOBUFS: %w", q.cfg.Queue, err)
		}
	}
	tv := unix.NsecToTimeval(q.cfg.StopLatency.Nanoseconds())
	if err := unix.SetsockoptTimeval(q.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("NFQUEUE %d: set the receive timeout: %w", q.cfg.Queue, err)
	}
	return q.configure(configMsg{queue: q.cfg.Queue, seq: 1, cmd: cmdBind, setParams: true,
		copyRange: q.cfg.CopyRange, maxQueueLen: q.cfg.MaxQueueLen, flags: q.cfg.Flags})
}

// configure sends one config request and waits for its acknowledgement. Packet messages that
// arrive meanwhile (the queue is bound before Serve runs) are sent back through the hook with
// Repeat, so they are queued again once the queue is fully configured: none is lost or let
// through unjudged.
func (q *Queue) configure(c configMsg) error {
	if _, err := unix.Write(q.fd, c.encode()); err != nil {
		return fmt.Errorf("%s: %w", c, err)
	}
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, err := unix.Read(q.fd, buf)
		if err != nil {
			if err == unix.EINTR || err == unix.EAGAIN || err == unix.ENOBUFS {
				continue
			}
			return fmt.Errorf("%s: waiting for the answer: %w", c, err)
		}
		for b := buf[:n]; ; {
			typ, body, rest, ok := nextMessage(b)
			if !ok {
				break
			}
			b = rest
			switch typ {
			case nlmsgError:
				errno, seq, ok := parseError(body)
				if !ok || seq != c.seq {
					continue
				}
				if errno != 0 {
					return configError(c, syscall.Errno(errno))
				}
				return nil
			case msgPacket:
				var p Packet
				if parsePacket(body, &p) == nil {
					var v [maxVerdictLen]byte
					n := putVerdict(v[:], p.Queue, p.ID, Repeat, false, false, 0)
					unix.Write(q.fd, v[:n])
				}
			}
		}
	}
	return fmt.Errorf("%s: no answer from the kernel within 5s", c)
}

func configError(c configMsg, errno syscall.Errno) error {
	switch errno {
	case unix.EBUSY, unix.EPERM:
		return fmt.Errorf("%s: %w (another socket is bound to this queue: is another agent running? stop it or choose another queue number)", c, errno)
	case unix.EOPNOTSUPP:
		return fmt.Errorf("%s: %w (this kernel does not support one of the flags)", c, errno)
	case unix.EINVAL:
		return fmt.Errorf("%s: %w (is the nfnetlink_queue module loaded?)", c, errno)
	}
	return fmt.Errorf("%s: %w (needs root or CAP_NET_ADMIN)", c, errno)
}

// alloc makes every buffer the reader will use, so that Serve allocates nothing.
func (q *Queue) alloc() {
	// A packet message is its attributes (under 200 bytes) plus the copied bytes; GSO packets
	// are copied up to CopyRange too. Anything larger is counted as truncated.
	size := align4(int(q.cfg.CopyRange)) + 1024
	n := q.cfg.Batch
	q.bufs = make([][]byte, n)
	q.iov = make([]unix.Iovec, n)
	q.names = make([]unix.RawSockaddrNetlink, n)
	q.hdrs = make([]mmsghdr, n)
	q.vbuf = make([]byte, n*maxVerdictLen)
	for i := range n {
		q.bufs[i] = make([]byte, size)
		q.iov[i].Base = &q.bufs[i][0]
		q.iov[i].SetLen(size)
		h := &q.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&q.names[i]))
		h.Iov = &q.iov[i]
		h.SetIovlen(1)
	}
}

// Stats returns the queue's counters.
func (q *Queue) Stats() *Stats { return &q.stats }

// Num is the queue number.
func (q *Queue) Num() uint16 { return q.cfg.Queue }

// Serve reads packets and answers each with the handler's verdict until Close. It locks its
// goroutine to an OS thread and blocks in the kernel between packets (no netpoller), the way a
// C reader does. It returns nil after Close, or the error that stopped it.
func (q *Queue) Serve(h Handler) error {
	q.mu.Lock()
	switch q.state {
	case stServing:
		q.mu.Unlock()
		return errors.New("queue is already being served")
	case stClosed:
		q.mu.Unlock()
		return errors.New("queue is closed")
	}
	q.state = stServing
	q.mu.Unlock()
	defer close(q.served)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for !q.closing.Load() {
		n, errno := q.recv()
		if errno != 0 {
			switch errno {
			case unix.EAGAIN, unix.EINTR:
			case unix.ENOBUFS:
				q.stats.ENOBUFS.Add(1)
			case unix.EBADF, unix.ENOTSOCK:
				return fmt.Errorf("queue %d: receive: %w", q.cfg.Queue, errno)
			default:
				q.stats.RecvErrors.Add(1)
				if q.cfg.OnError != nil {
					q.cfg.OnError(fmt.Errorf("queue %d: receive: %w", q.cfg.Queue, errno))
				}
				// Do not spin on a persistent error.
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		q.stats.Receives.Add(1)
		q.handle(n, h)
	}
	return nil
}

// recv takes up to Batch messages: it blocks for the first and takes the others only if they
// are already there.
func (q *Queue) recv() (int, syscall.Errno) {
	for i := range q.hdrs {
		q.hdrs[i].Hdr.Namelen = uint32(unsafe.Sizeof(q.names[i]))
	}
	flags := 0
	if len(q.hdrs) > 1 {
		flags = unix.MSG_WAITFORONE
	}
	r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(q.fd), uintptr(unsafe.Pointer(&q.hdrs[0])),
		uintptr(len(q.hdrs)), uintptr(flags), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), 0
}

// handle decodes the n messages just received, asks h for each packet's verdict and sends the
// verdicts in one write.
func (q *Queue) handle(n int, h Handler) {
	nv, off := 0, 0
	same := true
	var first Verdict
	var firstMark uint32
	var firstSet bool
	var lastID uint32
	var queue uint16
	for i := range n {
		m := &q.hdrs[i]
		if q.names[i].Pid != 0 {
			// Only the kernel speaks for the queue; a process of this namespace with
			// CAP_NET_ADMIN could otherwise feed us messages.
			q.stats.Foreign.Add(1)
			continue
		}
		b := q.bufs[i][:min(int(m.Len), len(q.bufs[i]))]
		if m.Hdr.Flags&unix.MSG_TRUNC != 0 {
			q.stats.Truncated.Add(1)
		}
		for {
			typ, body, rest, ok := nextMessage(b)
			if !ok {
				if len(b) > 0 {
					q.stats.Malformed.Add(1)
				}
				break
			}
			b = rest
			switch typ {
			case msgPacket:
				p := &q.pkt
				if parsePacket(body, p) != nil {
					q.stats.Malformed.Add(1)
					continue
				}
				q.stats.Packets.Add(1)
				v := h(p)
				if nv == 0 {
					first, firstMark, firstSet = v, p.newMark, p.setMark
				} else if v != first || p.setMark != firstSet || p.newMark != firstMark {
					same = false
				}
				lastID, queue = p.ID, p.Queue
				off += putVerdict(q.vbuf[off:], p.Queue, p.ID, v, false, p.setMark, p.newMark)
				nv++
			case nlmsgError:
				// A verdict the kernel refused (an unknown id, say) comes back as an error.
				if errno, _, ok := parseError(body); ok && errno != 0 {
					q.stats.VerdictErrors.Add(1)
				}
			case nlmsgDone:
			}
		}
	}
	if nv == 0 {
		return
	}
	out := q.vbuf[:off]
	if nv > 1 && same && q.cfg.BatchVerdict {
		out = q.vbuf[:putVerdict(q.vbuf, queue, lastID, first, true, firstSet, firstMark)]
	}
	for {
		_, _, e := unix.Syscall(unix.SYS_WRITE, uintptr(q.fd), uintptr(unsafe.Pointer(&out[0])), uintptr(len(out)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			q.stats.VerdictErrors.Add(1)
			if q.cfg.OnError != nil {
				q.cfg.OnError(fmt.Errorf("queue %d: verdict: %w", q.cfg.Queue, e))
			}
		}
		return
	}
}

// Close stops Serve (within StopLatency) and closes the socket, which unbinds the queue: the
// kernel drops the packets still waiting for a verdict, and later ones follow the rule's
// --queue-bypass. Close is safe to call more than once and from any goroutine.
func (q *Queue) Close() error {
	q.mu.Lock()
	st := q.state
	q.state = stClosed
	q.mu.Unlock()
	if st == stClosed {
		return nil
	}
	q.closing.Store(true)
	if st == stServing {
		// The socket is closed only after the reader has left its receive call, so the file
		// descriptor cannot be reused under it.
		<-q.served
	}
	return unix.Close(q.fd)
}
