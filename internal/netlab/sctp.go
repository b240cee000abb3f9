package netlab

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"sync"
	"time"
)

// SCTP probes use raw IP sockets instead of the kernel's SCTP stack, because kernels built
// without CONFIG_IP_SCTP (this project's machines among them) have no SCTP sockets at all, while
// conntrack and the NFQUEUE path still handle SCTP packets. A probe sends a well-formed INIT chunk
// (CRC32c checksum, so conntrack tracks it as NEW instead of INVALID) and counts as "allowed" when
// the INIT reaches the destination namespace: the first packet of an association is exactly what
// the policy judges. Where the kernel does have SCTP, it answers the INIT with an ABORT, which is
// harmless.

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type sctpRegistry struct {
	mu      sync.Mutex
	ports   map[*Host]map[uint16]bool
	waiters map[uint32]chan struct{} // by INIT initiate tag
}

func (r *sctpRegistry) init() {
	r.ports = map[*Host]map[uint16]bool{}
	r.waiters = map[uint32]chan struct{}{}
}

func (r *sctpRegistry) listen(h *Host, port uint16) error {
	r.mu.Lock()
	ports := r.ports[h]
	r.mu.Unlock()
	if ports == nil {
		var conns []*net.IPConn
		err := h.Do(func() error {
			for _, network := range []string{"ip4:132", "ip6:132"} {
				c, err := net.ListenIP(network, nil)
				if err != nil {
					return fmt.Errorf("raw %s socket: %w", network, err)
				}
				conns = append(conns, c)
			}
			return nil
		})
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return fmt.Errorf("netlab: %s: sctp listener: %w", h.Name, err)
		}
		for _, c := range conns {
			if err := h.lab.addCloser(c); err != nil {
				return err
			}
			go r.read(h, c)
		}
		r.mu.Lock()
		if r.ports[h] == nil {
			r.ports[h] = map[uint16]bool{}
		}
		ports = r.ports[h]
		r.mu.Unlock()
	}
	r.mu.Lock()
	ports[port] = true
	r.mu.Unlock()
	return nil
}

func (r *sctpRegistry) read(h *Host, c *net.IPConn) {
	buf := make([]byte, 2048)
	for {
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		dstPort, tag, ok := parseSCTPInit(buf[:n])
		if !ok {
			continue
		}
		r.mu.Lock()
		if r.ports[h][dstPort] {
			if ch := r.waiters[tag]; ch != nil {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		}
		r.mu.Unlock()
	}
}

func (r *sctpRegistry) probe(from *Host, dst netip.AddrPort, timeout time.Duration) (bool, error) {
	dh := from.lab.HostByAddr(dst.Addr())
	if dh == nil {
		return false, fmt.Errorf("netlab: sctp %s -> %s: the destination is not a host of this lab", from.Name, dst)
	}
	r.mu.Lock()
	listening := r.ports[dh][dst.Port()]
	r.mu.Unlock()
	if !listening {
		return false, fmt.Errorf("netlab: sctp %s -> %s: nothing listens there: call Serve(SCTP, %d) on %s first", from.Name, dst, dst.Port(), dh.Name)
	}

	var rb [6]byte
	rand.Read(rb[:])
	tag := binary.BigEndian.Uint32(rb[:4]) | 1 // an initiate tag of 0 is invalid
	srcPort := 32768 + binary.BigEndian.Uint16(rb[4:])%28000
	ch := make(chan struct{}, 1)
	r.mu.Lock()
	r.waiters[tag] = ch
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.waiters, tag)
		r.mu.Unlock()
	}()

	network := "ip4:132"
	if dst.Addr().Is6() {
		network = "ip6:132"
	}
	var c *net.IPConn
	if err := from.Do(func() (err error) {
		c, err = net.DialIP(network, nil, &net.IPAddr{IP: dst.Addr().AsSlice()})
		return err
	}); err != nil {
		return classify(err, "sctp", from, dst)
	}
	defer c.Close()
	pkt := sctpInit(srcPort, dst.Port(), tag)
	deadline := time.Now().Add(timeout)
	const tries = 4
	step := timeout / tries
	for i := 0; i < tries; i++ {
		if _, err := c.Write(pkt); err != nil {
			return classify(err, "sctp", from, dst)
		}
		wait := step
		if i == tries-1 {
			wait = time.Until(deadline)
		}
		select {
		case <-ch:
			return true, nil
		case <-time.After(wait):
		}
	}
	return false, nil
}

// sctpInit builds an SCTP common header with one INIT chunk (RFC 9260 §3.3.2).
func sctpInit(srcPort, dstPort uint16, tag uint32) []byte {
	b := make([]byte, 32)
	be := binary.BigEndian
	be.PutUint16(b[0:], srcPort)
	be.PutUint16(b[2:], dstPort)
	// verification tag b[4:8] stays 0: required for a packet carrying INIT
	b[12] = 1 // chunk type INIT
	be.PutUint16(b[14:], 20)
	be.PutUint32(b[16:], tag)
	be.PutUint32(b[20:], 65535) // advertised receiver window
	be.PutUint16(b[24:], 1)     // outbound streams
	be.PutUint16(b[26:], 1)     // inbound streams
	be.PutUint32(b[28:], tag^0x5a5a5a5a)
	// CRC32c over the whole packet with the field zeroed, stored least significant byte first
	// (what Linux's sctp_compute_cksum does), otherwise conntrack calls the packet INVALID.
	binary.LittleEndian.PutUint32(b[8:], crc32.Checksum(b, castagnoli))
	return b
}

func parseSCTPInit(b []byte) (dstPort uint16, tag uint32, ok bool) {
	if len(b) < 32 || b[12] != 1 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint16(b[2:]), binary.BigEndian.Uint32(b[16:]), true
}
