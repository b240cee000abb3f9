package netlab

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// What a hostile pod can do, for the adversarial tests: forge any packet and put it on its
// eth0 towards the node (Inject, with the packets built by Segment, UDPPacket and ICMPPacket),
// add addresses to its interface (AddAddr), flood (FloodUDP); and what a test needs to see the
// outcome: a capture of what really arrives on a host's eth0 (Capture).

// AddAddr gives the host's eth0 one more address (/32 or /128), as a pod root with NET_ADMIN
// can. The lab's bookkeeping does not learn it: to the lab (and to the policy) the address
// still belongs to nobody.
func (h *Host) AddAddr(a netip.Addr) error {
	a = a.Unmap()
	line := fmt.Sprintf("addr add %s dev eth0", netip.PrefixFrom(a, a.BitLen()))
	if a.Is6() {
		line += " nodad"
	}
	if err := h.ipBatch(line + "\n"); err != nil {
		return fmt.Errorf("netlab: %s: add address %s: %w", h.Name, a, err)
	}
	return nil
}

// FlushConntrack empties the node's connection tracking table, as a conntrack-flushing
// component (or a load test) would.
func (l *Lab) FlushConntrack() error {
	if _, err := l.node.Exec("conntrack", "-F"); err != nil {
		return fmt.Errorf("netlab: flush conntrack: %w (install conntrack: hack/deps.sh)", err)
	}
	return nil
}

// gatewayMAC is the MAC address of the node side of h's veth, where Inject sends frames.
func (l *Lab) gatewayMAC(h *Host) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := l.node.Do(func() error {
		ifc, err := net.InterfaceByName(h.Veth)
		if err != nil {
			return err
		}
		mac = ifc.HardwareAddr
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("netlab: node side of %s's veth: %w", h.Name, err)
	}
	return mac, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func etherType(pkt []byte) (uint16, error) {
	if len(pkt) == 0 {
		return 0, errors.New("empty packet")
	}
	switch pkt[0] >> 4 {
	case 4:
		return syscall.ETH_P_IP, nil
	case 6:
		return syscall.ETH_P_IPV6, nil
	}
	return 0, fmt.Errorf("IP version %d", pkt[0]>>4)
}

// Inject puts complete IP packets (v4 or v6, headers as given: any source address, any hop
// limit) on the host's eth0 addressed to the node's side of the veth, through an AF_PACKET
// socket: the host's own routing, neighbour table and TCP stack are not involved, exactly as
// with a pod that writes to a packet socket.
func (h *Host) Inject(pkts ...[]byte) error {
	if h.Veth == "" {
		return errors.New("netlab: Inject: the node has no veth of its own; inject from a host")
	}
	mac, err := h.lab.gatewayMAC(h)
	if err != nil {
		return err
	}
	return h.Do(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_DGRAM, 0)
		if err != nil {
			return fmt.Errorf("netlab: %s: packet socket: %w", h.Name, err)
		}
		defer syscall.Close(fd)
		for _, p := range pkts {
			et, err := etherType(p)
			if err != nil {
				return fmt.Errorf("netlab: Inject: %w", err)
			}
			sa := &syscall.SockaddrLinklayer{Protocol: htons(et), Ifindex: ifc.Index, Halen: 6}
			copy(sa.Addr[:], mac)
			if err := syscall.Sendto(fd, p, 0, sa); err != nil {
				return fmt.Errorf("netlab: %s: inject: %w", h.Name, err)
			}
		}
		return nil
	})
}

// Segment is a TCP segment to forge.
type Segment struct {
	Src, Dst                netip.AddrPort
	SYN, ACK, RST, FIN, PSH bool
	Seq, Ack                uint32
	Window                  uint16
	// MD5 adds a TCP MD5 signature option (RFC 2385) with a junk digest. A Linux receiver
	// without a key for the peer discards such a segment silently: no RST, no challenge ACK.
	MD5     bool
	Payload []byte
}

// Bytes is the segment as an IP packet, checksums computed.
func (s Segment) Bytes() ([]byte, error) {
	tcp := &layers.TCP{
		SrcPort: layers.TCPPort(s.Src.Port()), DstPort: layers.TCPPort(s.Dst.Port()),
		Seq: s.Seq, Ack: s.Ack, Window: s.Window,
		SYN: s.SYN, ACK: s.ACK, RST: s.RST, FIN: s.FIN, PSH: s.PSH,
	}
	if tcp.Window == 0 {
		tcp.Window = 64240
	}
	if s.MD5 {
		tcp.Options = append(tcp.Options,
			layers.TCPOption{OptionType: layers.TCPOptionKindNop, OptionLength: 1},
			layers.TCPOption{OptionType: layers.TCPOptionKindNop, OptionLength: 1},
			layers.TCPOption{OptionType: 19, OptionLength: 18, OptionData: bytes.Repeat([]byte{0xa5}, 16)})
	}
	return serialize(s.Src.Addr(), s.Dst.Addr(), layers.IPProtocolTCP, 64, tcp, gopacket.Payload(s.Payload))
}

// UDPPacket is a UDP datagram as an IP packet, checksums computed.
func UDPPacket(src, dst netip.AddrPort, payload []byte) ([]byte, error) {
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	return serialize(src.Addr(), dst.Addr(), layers.IPProtocolUDP, 64, udp, gopacket.Payload(payload))
}

// ICMPPacket is an ICMP (IPv4 addresses) or ICMPv6 (IPv6 addresses) message of the given type
// and code; body is everything after the 4-byte type/code/checksum header (identifier and
// sequence, an embedded header, data). hopLimit 0 means 64.
func ICMPPacket(src, dst netip.Addr, typ, code uint8, body []byte, hopLimit uint8) ([]byte, error) {
	if hopLimit == 0 {
		hopLimit = 64
	}
	if src.Unmap().Is4() {
		// gopacket's ICMPv4 layer owns the 4 bytes after the checksum (id, seq); hand them over
		// so the body stays exactly as given.
		var id, seq uint16
		rest := body
		if len(body) >= 4 {
			id, seq, rest = uint16(body[0])<<8|uint16(body[1]), uint16(body[2])<<8|uint16(body[3]), body[4:]
		}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, code), Id: id, Seq: seq}
		return serialize(src, dst, layers.IPProtocolICMPv4, hopLimit, icmp, gopacket.Payload(rest))
	}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, code)}
	return serialize(src, dst, layers.IPProtocolICMPv6, hopLimit, icmp, gopacket.Payload(body))
}

type checksummed interface {
	SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
}

func serialize(src, dst netip.Addr, proto layers.IPProtocol, ttl uint8, l4 gopacket.SerializableLayer, payload gopacket.Payload) ([]byte, error) {
	src, dst = src.Unmap(), dst.Unmap()
	if src.Is4() != dst.Is4() {
		return nil, fmt.Errorf("netlab: packet %s -> %s mixes address families", src, dst)
	}
	var ip interface {
		gopacket.NetworkLayer
		gopacket.SerializableLayer
	}
	if src.Is4() {
		ip = &layers.IPv4{Version: 4, TTL: ttl, Protocol: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice(), Id: uint16(time.Now().UnixNano())}
	} else {
		ip = &layers.IPv6{Version: 6, HopLimit: ttl, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	}
	if c, ok := l4.(checksummed); ok {
		if err := c.SetNetworkLayerForChecksum(ip); err != nil {
			return nil, err
		}
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ip, l4, payload); err != nil {
		return nil, fmt.Errorf("netlab: build packet %s -> %s: %w", src, dst, err)
	}
	return buf.Bytes(), nil
}

// Capture records the packets arriving on a host's eth0 (incoming only, as the host's stack
// receives them, before any socket or firewall of the host judges them) that a match function
// selects. It is how a test sees a one-way packet (UDP, ICMP) that no socket would answer.
type Capture struct {
	mu      sync.Mutex
	pkts    [][]byte
	arrived chan struct{}
	fd      int
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// maxCaptured bounds what a capture keeps, so a flood that matches cannot exhaust memory.
const maxCaptured = 1024

// Capture starts recording the packets that arrive on the host's eth0 and satisfy match (it
// sees the whole IP packet). Close it, or let the lab close it.
func (h *Host) Capture(match func(pkt []byte) bool) (*Capture, error) {
	c := &Capture{arrived: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	err := h.Do(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_DGRAM, int(htons(syscall.ETH_P_ALL)))
		if err != nil {
			return err
		}
		if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(syscall.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			syscall.Close(fd)
			return err
		}
		// Reads wake up regularly so Close never waits on a quiet interface.
		tv := syscall.NsecToTimeval(int64(100 * time.Millisecond))
		if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
			syscall.Close(fd)
			return err
		}
		c.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("netlab: %s: capture on eth0: %w", h.Name, err)
	}
	go c.read(match)
	if err := h.lab.addCloser(c); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Capture) read(match func([]byte) bool) {
	defer close(c.done)
	defer syscall.Close(c.fd)
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, from, err := syscall.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
				continue
			}
			return
		}
		if ll, ok := from.(*syscall.SockaddrLinklayer); ok && ll.Pkttype == syscall.PACKET_OUTGOING {
			continue
		}
		if !match(buf[:n]) {
			continue
		}
		c.mu.Lock()
		if len(c.pkts) < maxCaptured {
			c.pkts = append(c.pkts, bytes.Clone(buf[:n]))
		}
		c.mu.Unlock()
		select {
		case c.arrived <- struct{}{}:
		default:
		}
	}
}

// Packets is a copy of what was recorded so far.
func (c *Capture) Packets() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.pkts...)
}

// Wait waits until at least n packets were recorded or timeout passed, and returns how many
// were.
func (c *Capture) Wait(n int, timeout time.Duration) int {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		got := len(c.pkts)
		c.mu.Unlock()
		if got >= n {
			return got
		}
		select {
		case <-c.arrived:
		case <-deadline.C:
			c.mu.Lock()
			defer c.mu.Unlock()
			return len(c.pkts)
		}
	}
}

// Close stops the capture.
func (c *Capture) Close() error {
	c.once.Do(func() { close(c.stop) })
	<-c.done
	return nil
}

// Flood says how FloodUDP floods; every bound is required, so no flood runs unbounded.
type Flood struct {
	Dst netip.Addr
	// Ports are the destination ports cycled through, so every datagram of a round belongs to
	// another flow (5-tuple): NEW to conntrack until answered, a new entry in every table.
	FirstPort, Ports uint16
	// SrcPorts is how many source sockets take turns (1 if 0); each is one more source port.
	SrcPorts int
	// Rate is datagrams per second (0: as fast as the host can send).
	Rate        int
	MaxPackets  int
	MaxDuration time.Duration
	// Stop, when not nil, ends the flood early once closed.
	Stop <-chan struct{}
}

// FloodUDP sends small UDP datagrams from the host until MaxPackets were sent, MaxDuration
// passed or Stop closed, and returns how many were sent. Send errors (a full socket buffer, an
// ICMP error reported on the socket) are counted as not sent and do not end the flood.
func (h *Host) FloodUDP(f Flood) (sent int, err error) {
	if f.MaxPackets <= 0 || f.MaxDuration <= 0 || f.Ports == 0 {
		return 0, errors.New("netlab: FloodUDP: give MaxPackets, MaxDuration and Ports")
	}
	if f.SrcPorts <= 0 {
		f.SrcPorts = 1
	}
	network := "udp4"
	if f.Dst.Unmap().Is6() {
		network = "udp6"
	}
	conns := make([]*net.UDPConn, 0, f.SrcPorts)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err := h.Do(func() error {
		for i := 0; i < f.SrcPorts; i++ {
			c, err := net.ListenUDP(network, nil)
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		return 0, fmt.Errorf("netlab: %s: flood sockets: %w", h.Name, err)
	}
	// sendmmsg, 64 datagrams a call: a flooder that spends its CPU on syscalls leaves the
	// node less to forward with, on a machine of few CPUs.
	type batcher interface {
		WriteBatch(ms []ipv4.Message, flags int) (int, error)
	}
	pcs := make([]batcher, len(conns))
	for i, c := range conns {
		if network == "udp4" {
			pcs[i] = ipv4.NewPacketConn(c)
		} else {
			pcs[i] = ipv6.NewPacketConn(c)
		}
	}
	dsts := make([]net.Addr, f.Ports)
	for i := range dsts {
		dsts[i] = net.UDPAddrFromAddrPort(netip.AddrPortFrom(f.Dst, f.FirstPort+uint16(i)))
	}
	const batch = 64
	msgs := make([]ipv4.Message, batch)
	payload := []byte("sluice-flood")
	for i := range msgs {
		msgs[i].Buffers = [][]byte{payload}
	}
	start := time.Now()
	end := start.Add(f.MaxDuration)
	for i := 0; sent < f.MaxPackets; {
		now := time.Now()
		if !now.Before(end) {
			break
		}
		if f.Stop != nil {
			select {
			case <-f.Stop:
				return sent, nil
			default:
			}
		}
		if f.Rate > 0 {
			// Pace by the schedule, not by sleeps that add up.
			due := start.Add(time.Duration(int64(i) * int64(time.Second) / int64(f.Rate)))
			if d := due.Sub(now); d > 0 {
				time.Sleep(d)
			}
		}
		n := min(batch, f.MaxPackets-sent)
		for j := 0; j < n; j++ {
			msgs[j].Addr = dsts[(i+j)%len(dsts)]
		}
		pc := pcs[(i/len(dsts))%len(pcs)]
		if k, err := pc.WriteBatch(msgs[:n], 0); err == nil {
			sent += k
		}
		i += n
	}
	return sent, nil
}
