package netlab

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/sluice-dev/sluice/policy"
)

// Proto is the policy package's protocol number, so probes and verdicts speak of one type.
type Proto = policy.Protocol

const (
	TCP  = policy.TCP
	UDP  = policy.UDP
	SCTP = policy.SCTP
)

// ParseProto reads "tcp", "udp" or "sctp" in any case.
func ParseProto(s string) (Proto, error) {
	switch {
	case equalFold(s, "tcp"):
		return TCP, nil
	case equalFold(s, "udp"):
		return UDP, nil
	case equalFold(s, "sctp"):
		return SCTP, nil
	}
	return 0, fmt.Errorf("netlab: protocol %q: use tcp, udp or sctp", s)
}

func equalFold(a, b string) bool { return bytes.EqualFold([]byte(a), []byte(b)) }

// Serve starts an echo service on port on every address of the host (IPv4 and IPv6), running
// until the lab closes: TCP echoes what it reads, UDP answers every datagram with itself, and
// SCTP records every INIT that reaches the port (see Probe).
func (h *Host) Serve(proto Proto, port uint16) error {
	switch proto {
	case TCP:
		var ln net.Listener
		if err := h.Do(func() (err error) {
			ln, err = net.Listen("tcp", ":"+strconv.Itoa(int(port)))
			return err
		}); err != nil {
			return fmt.Errorf("netlab: %s: listen tcp/%d: %w", h.Name, port, err)
		}
		if err := h.lab.addCloser(ln); err != nil {
			return err
		}
		go serveTCP(ln)
		return nil
	case UDP:
		var pc net.PacketConn
		if err := h.Do(func() (err error) {
			pc, err = net.ListenPacket("udp", ":"+strconv.Itoa(int(port)))
			return err
		}); err != nil {
			return fmt.Errorf("netlab: %s: listen udp/%d: %w", h.Name, port, err)
		}
		if err := h.lab.addCloser(pc); err != nil {
			return err
		}
		h.lab.mu.Lock()
		h.lab.udpPorts[udpKey{h, port}] = true
		h.lab.mu.Unlock()
		go serveUDP(pc)
		return nil
	case SCTP:
		return h.lab.sctp.listen(h, port)
	}
	return fmt.Errorf("netlab: Serve: unsupported protocol %v", proto)
}

// ServeAll starts echo services for every protocol and port given.
func (h *Host) ServeAll(protos []Proto, ports ...uint16) error {
	for _, p := range protos {
		for _, port := range ports {
			if err := h.Serve(p, port); err != nil {
				return err
			}
		}
	}
	return nil
}

func serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: back off instead of spinning
			continue
		}
		go func() {
			defer c.Close()
			// A probe sends one byte and waits for it; a connection that says nothing is dropped
			// after a while so a stuck client cannot pin a goroutine forever.
			c.SetDeadline(time.Now().Add(30 * time.Second))
			buf := make([]byte, 512)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

func serveUDP(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		pc.WriteTo(buf[:n], from)
	}
}

// Probe opens a real connection from one host to an address and reports whether it got
// through: TCP connects and exchanges one byte; UDP sends a random token and waits for the echo
// (re-sending a few times within the timeout); SCTP sends an INIT chunk from a raw socket and
// waits until the destination's Serve(SCTP) saw it arrive (see sctp.go for why raw).
//
// A connection that times out (the packets were dropped on the way) is (false, nil). An answer
// that proves the path works but nothing listens (TCP reset, ICMP port unreachable) or that the
// network is unreachable is (false, err), because it means the lab, not the policy, is wrong.
func (l *Lab) Probe(from *Host, to netip.Addr, proto Proto, port uint16, timeout time.Duration) (bool, error) {
	to = to.Unmap()
	dst := netip.AddrPortFrom(to, port)
	switch proto {
	case TCP:
		return probeTCP(from, dst, timeout)
	case UDP:
		if dh := l.HostByAddr(to); dh != nil {
			l.mu.Lock()
			ok := l.udpPorts[udpKey{dh, port}]
			l.mu.Unlock()
			if !ok {
				return false, fmt.Errorf("netlab: udp %s -> %s: nothing listens there: call Serve(UDP, %d) on %s first", from.Name, dst, port, dh.Name)
			}
		}
		return probeUDP(from, dst, timeout)
	case SCTP:
		return l.sctp.probe(from, dst, timeout)
	}
	return false, fmt.Errorf("netlab: Probe: unsupported protocol %v", proto)
}

func probeTCP(from *Host, dst netip.AddrPort, timeout time.Duration) (bool, error) {
	deadline := time.Now().Add(timeout)
	var c net.Conn
	err := from.Do(func() (err error) {
		d := net.Dialer{Deadline: deadline}
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		return classify(err, "tcp", from, dst)
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte{0x5a}); err != nil {
		return classify(err, "tcp", from, dst)
	}
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil {
		return classify(err, "tcp", from, dst)
	}
	if b[0] != 0x5a {
		return false, fmt.Errorf("netlab: tcp %s -> %s: echo returned %#x, want 0x5a", from.Name, dst, b[0])
	}
	return true, nil
}

func probeUDP(from *Host, dst netip.AddrPort, timeout time.Duration) (bool, error) {
	deadline := time.Now().Add(timeout)
	// Unconnected on purpose: a wildcard echo server answers from the address the kernel picks
	// for the way back, which differs from dst when the client's own source is link-local (the
	// node without AddNodeAddr talking IPv6); the random token proves the round trip instead.
	var c *net.UDPConn
	err := from.Do(func() (err error) {
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		c, err = net.ListenUDP(network, nil)
		return err
	})
	if err != nil {
		return classify(err, "udp", from, dst)
	}
	defer c.Close()
	token := make([]byte, 16)
	rand.Read(token)
	buf := make([]byte, 64)
	// Re-send a few times: every datagram of a flow not yet answered is NEW to conntrack, so a
	// lost first one (e.g. held in a neighbour queue) must not read as "dropped by policy".
	const tries = 4
	step := timeout / tries
	for i := 0; i < tries; i++ {
		if _, err := c.WriteToUDPAddrPort(token, dst); err != nil {
			return classify(err, "udp", from, dst)
		}
		end := time.Now().Add(step)
		if i == tries-1 || end.After(deadline) {
			end = deadline
		}
		c.SetReadDeadline(end)
		for {
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				if isTimeout(err) {
					break
				}
				return classify(err, "udp", from, dst)
			}
			if bytes.Equal(buf[:n], token) {
				return true, nil
			}
		}
		if !time.Now().Before(deadline) {
			break
		}
	}
	return false, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func classify(err error, proto string, from *Host, dst netip.AddrPort) (bool, error) {
	if isTimeout(err) {
		return false, nil
	}
	hint := ""
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		hint = " (nothing listens there: call Serve on the destination host first)"
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		hint = " (no route: is the destination a host of this lab?)"
	}
	return false, fmt.Errorf("netlab: %s %s -> %s: %w%s", proto, from.Name, dst, err, hint)
}

func writeFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
