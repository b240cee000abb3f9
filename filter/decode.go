package filter

import (
	"encoding/binary"
	"net/netip"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/sluice-dev/sluice/policy"
)

// HeaderBytes is how much of a packet the decoder needs: every header it reads (IPv4 with
// options 60 + TCP with options 60, or IPv6 with extension headers), never the payload beyond
// that. The queue asks the kernel to copy this much.
const HeaderBytes = 160

// Kind says how the verdict logic must treat a decoded packet.
type Kind uint8

const (
	// KindPorts: TCP, UDP or SCTP with both ports decoded; judged by policy.
	KindPorts Kind = iota
	// KindQuery: ICMP echo request and other informational ICMP, and IP protocols without ports;
	// judged by policy as a flow with port 0 (a NetworkPolicy rule without ports admits them).
	KindQuery
	// KindQueryReply: ICMP echo reply and the other query replies; accepted only as the reply of
	// a request sluice accepted (the return table, keyed on the query identifier).
	KindQueryReply
	// KindError: an ICMP or ICMPv6 error. Errors about a connection conntrack holds are RELATED
	// and never reach the queue, so one that does is about nothing sluice accepted: dropped (an
	// error carries data a pod could use as a covert channel).
	KindError
	// KindND: ICMPv6 neighbour discovery, router solicitation/advertisement, redirect and MLD.
	// Accepted only where it cannot leave the link (a link-scope destination, and for neighbour
	// discovery hop limit 255, as RFC 4861 requires); otherwise judged like KindQuery.
	KindND
	// KindFragment: a non-first fragment; it carries no ports. Accepted: the first fragment,
	// which carries the ports, was judged, and without it the receiver cannot reassemble the
	// datagram. With conntrack loaded the kernel reassembles before NFQUEUE anyway, so these
	// are rare.
	KindFragment
	// KindMalformed: headers that do not parse (truncated, bad lengths, bad version). Dropped
	// in both fail modes: the receiver would discard them anyway, and a packet sluice cannot read
	// is exactly what an attempt to slip past a filter looks like.
	KindMalformed
)

var kindNames = [...]string{"ports", "query", "query-reply", "error", "nd", "fragment", "malformed"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// TCP flag bits as in the header's 13th byte.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// SCTP chunk types that matter here.
const sctpInit = 1

// Packet is what the verdict logic needs from one queued packet. Small and pointer-free apart
// from the addresses, so a worker keeps one and overwrites it for each packet.
type Packet struct {
	Flow      policy.Flow // Port is the destination port (0 without ports)
	SrcPort   uint16
	Kind      Kind
	TCPFlags  uint8
	SCTPChunk uint8 // type of the first chunk
	ICMPType  uint8
	// ID is the identifier of an ICMP query or its reply (echo, timestamp, ...), which pairs
	// them as ports pair the two directions of a connection.
	ID uint16
	// HopLimit is the IPv6 hop limit or the IPv4 TTL; LinkScope says the destination is
	// link-local unicast or link-scope multicast (it cannot be forwarded).
	HopLimit  uint8
	LinkScope bool
	// FirstFragment is set when the packet is the first fragment of a fragmented datagram; it
	// is judged like any packet.
	FirstFragment bool
}

// NDLocal reports whether a KindND packet stays on the link: a link-scope destination, and for
// neighbour discovery proper (types 133-137) the hop limit 255 that only an on-link sender can
// produce.
func (p *Packet) NDLocal() bool {
	if p.Kind != KindND || !p.LinkScope {
		return false
	}
	if p.ICMPType >= 133 && p.ICMPType <= 137 {
		return p.HopLimit == 255
	}
	return true // MLD: link-scope multicast, hop limit 1
}

// Opening reports whether the packet can open a connection at the receiver: a TCP SYN without
// ACK, an SCTP INIT, and anything connectionless. Packets that cannot (a mid-stream TCP ACK, an
// SCTP DATA chunk, an echo reply) may be accepted as the reply of a flow allowed the other way.
func (p *Packet) Opening() bool {
	switch p.Kind {
	case KindQueryReply:
		return false
	case KindPorts:
		switch p.Flow.Proto {
		case policy.TCP:
			return p.TCPFlags&(tcpSYN|tcpACK) == tcpSYN
		case policy.SCTP:
			return p.SCTPChunk == sctpInit
		}
	}
	return true
}

// Reverse is the flow of the other direction, as the peer would have opened it: from the
// destination to the source's port.
func (p *Packet) Reverse() policy.Flow {
	return policy.Flow{Src: p.Flow.Dst, Dst: p.Flow.Src, Proto: p.Flow.Proto, Port: p.SrcPort}
}

// Decoder decodes queued packets. It holds every layer preallocated and is reused for each
// packet, so decoding allocates nothing once warm; one per worker, not safe for concurrent use.
type Decoder struct {
	ip4   layers.IPv4
	ip6   ip6Header
	ext   layers.IPv6ExtensionSkipper
	frag6 ip6Fragment
	tcp   layers.TCP
	udp   layers.UDP
	sctp  layers.SCTP
	icmp4 layers.ICMPv4
	icmp6 layers.ICMPv6

	p4, p6  *gopacket.DecodingLayerParser
	decoded []gopacket.LayerType
}

// NewDecoder builds a decoder with its layers.
func NewDecoder() *Decoder {
	d := &Decoder{decoded: make([]gopacket.LayerType, 0, 16)}
	d.p4 = gopacket.NewDecodingLayerParser(layers.LayerTypeIPv4,
		&d.ip4, &d.tcp, &d.udp, &d.sctp, &d.icmp4)
	// The skipper claims every IPv6 extension header; the fragment header is registered after
	// it so that our own fragment layer, which keeps the offset, wins for that type.
	d.p6 = gopacket.NewDecodingLayerParser(layers.LayerTypeIPv6,
		&d.ip6, &d.ext, &d.frag6, &d.tcp, &d.udp, &d.sctp, &d.icmp6)
	for _, p := range []*gopacket.DecodingLayerParser{d.p4, d.p6} {
		// Stop quietly at layers we do not decode (application payloads, ICMPv6 bodies).
		p.IgnoreUnsupported = true
	}
	return d
}

// Decode fills p from a packet that starts with its IP header (as NFQUEUE delivers it). It
// never fails: what cannot be read is KindMalformed.
func (d *Decoder) Decode(data []byte, p *Packet) {
	*p = Packet{Kind: KindMalformed}
	if len(data) == 0 {
		return
	}
	d.decoded = d.decoded[:0]
	var l4 layers.IPProtocol
	var l4data []byte
	switch data[0] >> 4 {
	case 4:
		if err := d.p4.DecodeLayers(data, &d.decoded); err != nil {
			return
		}
		if len(d.decoded) == 0 {
			return
		}
		src, _ := netip.AddrFromSlice(d.ip4.SrcIP)
		dst, _ := netip.AddrFromSlice(d.ip4.DstIP)
		p.Flow.Src, p.Flow.Dst = src, dst
		p.HopLimit = d.ip4.TTL
		p.LinkScope = dst.IsLinkLocalUnicast() || dst.IsLinkLocalMulticast()
		l4 = d.ip4.Protocol
		if d.ip4.FragOffset != 0 {
			p.Kind = KindFragment
			p.Flow.Proto = policy.Protocol(l4)
			return
		}
		if d.ip4.Flags&layers.IPv4MoreFragments != 0 {
			// gopacket stops at a first fragment; its transport header is all there.
			p.FirstFragment = true
			l4data = d.ip4.Payload
		}
	case 6:
		if err := d.p6.DecodeLayers(data, &d.decoded); err != nil {
			return
		}
		if len(d.decoded) == 0 {
			return
		}
		p.Flow.Src = netip.AddrFrom16(d.ip6.src)
		p.Flow.Dst = netip.AddrFrom16(d.ip6.dst)
		p.HopLimit = d.ip6.hopLimit
		p.LinkScope = p.Flow.Dst.IsLinkLocalUnicast() || p.Flow.Dst.IsLinkLocalMulticast()
		l4 = d.ip6.next
		for _, t := range d.decoded[1:] {
			switch t {
			case layers.LayerTypeIPv6Fragment:
				l4 = d.frag6.next
				if d.frag6.offset != 0 {
					p.Kind = KindFragment
					p.Flow.Proto = policy.Protocol(l4)
					return
				}
				if d.frag6.more {
					p.FirstFragment = true
				}
			case layers.LayerTypeIPv6HopByHop, layers.LayerTypeIPv6Routing,
				layers.LayerTypeIPv6Destination:
				l4 = d.ext.NextHeader
			}
		}
	default:
		return
	}
	p.Flow.Proto = policy.Protocol(l4)
	last := d.decoded[len(d.decoded)-1]
	if l4data != nil {
		// First IPv4 fragment: decode the transport header by hand from the IP payload.
		last = d.decodeL4(l4, l4data)
		if last == gopacket.LayerTypeZero {
			return
		}
	}
	switch last {
	case layers.LayerTypeTCP:
		p.Kind = KindPorts
		p.SrcPort, p.Flow.Port = uint16(d.tcp.SrcPort), uint16(d.tcp.DstPort)
		if len(d.tcp.Contents) > 13 {
			p.TCPFlags = d.tcp.Contents[13]
		}
	case layers.LayerTypeUDP:
		p.Kind = KindPorts
		p.SrcPort, p.Flow.Port = uint16(d.udp.SrcPort), uint16(d.udp.DstPort)
	case layers.LayerTypeSCTP:
		p.Kind = KindPorts
		p.SrcPort, p.Flow.Port = uint16(d.sctp.SrcPort), uint16(d.sctp.DstPort)
		if len(d.sctp.Payload) > 0 {
			p.SCTPChunk = d.sctp.Payload[0]
		}
	case layers.LayerTypeICMPv4:
		p.ICMPType = d.icmp4.TypeCode.Type()
		p.Kind = icmp4Kind(p.ICMPType)
		if p.Kind == KindQueryReply || icmp4Query(p.ICMPType) {
			p.ID = d.icmp4.Id
		}
	case layers.LayerTypeICMPv6:
		p.ICMPType = d.icmp6.TypeCode.Type()
		p.Kind = icmp6Kind(p.ICMPType)
		if (p.ICMPType == layers.ICMPv6TypeEchoRequest || p.ICMPType == layers.ICMPv6TypeEchoReply) && len(d.icmp6.Payload) >= 2 {
			p.ID = binary.BigEndian.Uint16(d.icmp6.Payload)
		}
	default:
		switch l4 {
		case layers.IPProtocolTCP, layers.IPProtocolUDP, layers.IPProtocolSCTP,
			layers.IPProtocolICMPv4, layers.IPProtocolICMPv6:
			// The header that should follow did not decode (gopacket stopped short of it).
			return
		}
		// Another IP protocol (GRE, ESP, ...): no ports; judged as port 0.
		p.Kind = KindQuery
	}
}

// decodeL4 decodes a transport header outside the parser and returns its layer type, or
// LayerTypeZero when it does not parse.
func (d *Decoder) decodeL4(proto layers.IPProtocol, data []byte) gopacket.LayerType {
	var l gopacket.DecodingLayer
	var t gopacket.LayerType
	switch proto {
	case layers.IPProtocolTCP:
		l, t = &d.tcp, layers.LayerTypeTCP
	case layers.IPProtocolUDP:
		l, t = &d.udp, layers.LayerTypeUDP
	case layers.IPProtocolSCTP:
		l, t = &d.sctp, layers.LayerTypeSCTP
	case layers.IPProtocolICMPv4:
		l, t = &d.icmp4, layers.LayerTypeICMPv4
	default:
		return gopacket.LayerTypePayload
	}
	if err := l.DecodeFromBytes(data, gopacket.NilDecodeFeedback); err != nil {
		return gopacket.LayerTypeZero
	}
	return t
}

// ICMP types as conntrack pairs them: every query has a reply carrying its identifier, and
// the errors are what conntrack can mark RELATED.
func icmp4Kind(t uint8) Kind {
	switch t {
	case layers.ICMPv4TypeEchoReply, layers.ICMPv4TypeTimestampReply,
		layers.ICMPv4TypeInfoReply, layers.ICMPv4TypeAddressMaskReply:
		return KindQueryReply
	case layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4TypeSourceQuench,
		layers.ICMPv4TypeRedirect, layers.ICMPv4TypeTimeExceeded,
		layers.ICMPv4TypeParameterProblem:
		return KindError
	}
	return KindQuery
}

func icmp4Query(t uint8) bool {
	switch t {
	case layers.ICMPv4TypeEchoRequest, layers.ICMPv4TypeTimestampRequest,
		layers.ICMPv4TypeInfoRequest, layers.ICMPv4TypeAddressMaskRequest:
		return true
	}
	return false
}

func icmp6Kind(t uint8) Kind {
	switch t {
	case layers.ICMPv6TypeEchoReply:
		return KindQueryReply
	case layers.ICMPv6TypeDestinationUnreachable, layers.ICMPv6TypePacketTooBig,
		layers.ICMPv6TypeTimeExceeded, layers.ICMPv6TypeParameterProblem:
		return KindError
	case 130, 131, 132, 143, // MLD query/report/done, MLDv2 report
		layers.ICMPv6TypeRouterSolicitation, layers.ICMPv6TypeRouterAdvertisement,
		layers.ICMPv6TypeNeighborSolicitation, layers.ICMPv6TypeNeighborAdvertisement,
		layers.ICMPv6TypeRedirect:
		return KindND
	}
	// Echo request, unassigned and experimental types among them: judged.
	return KindQuery
}

// ip6Header decodes the fixed IPv6 header. gopacket's own IPv6 layer parses a hop-by-hop header
// into freshly allocated option structs; this one leaves it to the extension skipper, so MLD
// reports (which carry router-alert) cost nothing either.
type ip6Header struct {
	layers.BaseLayer
	src, dst [16]byte
	next     layers.IPProtocol
	hopLimit uint8
}

func (h *ip6Header) LayerType() gopacket.LayerType  { return layers.LayerTypeIPv6 }
func (h *ip6Header) CanDecode() gopacket.LayerClass { return layers.LayerTypeIPv6 }
func (h *ip6Header) NextLayerType() gopacket.LayerType {
	return h.next.LayerType()
}

func (h *ip6Header) DecodeFromBytes(data []byte, df gopacket.DecodeFeedback) error {
	if len(data) < 40 || data[0]>>4 != 6 {
		return errMalformed
	}
	h.next = layers.IPProtocol(data[6])
	h.hopLimit = data[7]
	copy(h.src[:], data[8:24])
	copy(h.dst[:], data[24:40])
	end := len(data)
	// Payload length 0 is a jumbogram (length in hop-by-hop): take what was captured.
	if n := int(binary.BigEndian.Uint16(data[4:6])); n != 0 && 40+n < end {
		end = 40 + n
	}
	h.BaseLayer = layers.BaseLayer{Contents: data[:40], Payload: data[40:end]}
	return nil
}

// ip6Fragment decodes the IPv6 fragment header, keeping the offset gopacket would let us read
// only through an allocation-free but less direct path.
type ip6Fragment struct {
	layers.BaseLayer
	next   layers.IPProtocol
	offset uint16
	more   bool
}

func (f *ip6Fragment) LayerType() gopacket.LayerType  { return layers.LayerTypeIPv6Fragment }
func (f *ip6Fragment) CanDecode() gopacket.LayerClass { return layers.LayerTypeIPv6Fragment }
func (f *ip6Fragment) NextLayerType() gopacket.LayerType {
	if f.offset != 0 {
		return gopacket.LayerTypeFragment
	}
	return f.next.LayerType()
}

func (f *ip6Fragment) DecodeFromBytes(data []byte, df gopacket.DecodeFeedback) error {
	if len(data) < 8 {
		return errMalformed
	}
	f.next = layers.IPProtocol(data[0])
	fo := binary.BigEndian.Uint16(data[2:4])
	f.offset = fo >> 3
	f.more = fo&1 != 0
	f.BaseLayer = layers.BaseLayer{Contents: data[:8], Payload: data[8:]}
	return nil
}

type malformedError struct{}

func (malformedError) Error() string { return "malformed header" }

// errMalformed is preallocated: returning it costs nothing on a flood of bad packets.
var errMalformed error = malformedError{}
