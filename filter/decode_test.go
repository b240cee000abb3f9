package filter

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/sluice-dev/sluice/policy"
)

var (
	a4 = netip.MustParseAddr("10.244.1.10")
	b4 = netip.MustParseAddr("10.244.1.20")
	a6 = netip.MustParseAddr("fd00:244::10")
	b6 = netip.MustParseAddr("fd00:244::20")
)

func ser(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatalf("serialize %v: %v", ls, err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func ip4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: proto, SrcIP: net.IP(a4.AsSlice()), DstIP: net.IP(b4.AsSlice())}
}

func ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: net.IP(a6.AsSlice()), DstIP: net.IP(b6.AsSlice())}
}

func tcpSeg(sport, dport uint16, syn, ack bool, nw gopacket.NetworkLayer) *layers.TCP {
	t := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(dport), SYN: syn, ACK: ack, Window: 64240,
		// A Linux SYN carries five options; more than gopacket's inline array of four.
		Options: []layers.TCPOption{
			{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{5, 0xb4}},
			{OptionType: layers.TCPOptionKindSACKPermitted, OptionLength: 2},
			{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)},
			{OptionType: layers.TCPOptionKindNop},
			{OptionType: layers.TCPOptionKindWindowScale, OptionLength: 3, OptionData: []byte{7}},
		}}
	_ = t.SetNetworkLayerForChecksum(nw)
	return t
}

// sctpPacket builds an SCTP common header and one chunk of the given type by hand.
func sctpPayload(sport, dport uint16, chunk uint8) gopacket.Payload {
	b := make([]byte, 12+16)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	b[12] = chunk
	binary.BigEndian.PutUint16(b[14:], 16)
	return gopacket.Payload(b)
}

type decodeCase struct {
	name string
	data []byte
	want Packet
}

func decodeCases(t testing.TB) []decodeCase {
	v4tcp := ip4(layers.IPProtocolTCP)
	v6tcp := ip6(layers.IPProtocolTCP)
	v4udp := ip4(layers.IPProtocolUDP)
	udp := &layers.UDP{SrcPort: 5353, DstPort: 53}
	_ = udp.SetNetworkLayerForChecksum(v4udp)
	v6udp := ip6(layers.IPProtocolUDP)
	udp6 := &layers.UDP{SrcPort: 40000, DstPort: 9000}
	_ = udp6.SetNetworkLayerForChecksum(v6udp)
	f4 := func(p policy.Protocol, port uint16) policy.Flow {
		return policy.Flow{Src: a4, Dst: b4, Proto: p, Port: port}
	}
	f6 := func(p policy.Protocol, port uint16) policy.Flow {
		return policy.Flow{Src: a6, Dst: b6, Proto: p, Port: port}
	}
	syn := ser(t, v4tcp, tcpSeg(40000, 80, true, false, v4tcp), gopacket.Payload("hello"))
	cases := []decodeCase{
		{"ipv4 tcp syn", syn, Packet{Flow: f4(policy.TCP, 80), SrcPort: 40000, Kind: KindPorts, TCPFlags: tcpSYN}},
		{"ipv4 tcp ack", ser(t, v4tcp, tcpSeg(40000, 80, false, true, v4tcp)), Packet{Flow: f4(policy.TCP, 80), SrcPort: 40000, Kind: KindPorts, TCPFlags: tcpACK}},
		{"ipv4 udp dns", ser(t, v4udp, udp, gopacket.Payload("q")), Packet{Flow: f4(policy.UDP, 53), SrcPort: 5353, Kind: KindPorts}},
		{"ipv4 sctp init", ser(t, ip4(layers.IPProtocolSCTP), sctpPayload(3000, 3868, 1)), Packet{Flow: f4(policy.SCTP, 3868), SrcPort: 3000, Kind: KindPorts, SCTPChunk: 1}},
		{"ipv4 sctp data", ser(t, ip4(layers.IPProtocolSCTP), sctpPayload(3000, 3868, 0)), Packet{Flow: f4(policy.SCTP, 3868), SrcPort: 3000, Kind: KindPorts, SCTPChunk: 0}},
		{"ipv4 icmp echo", ser(t, ip4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 7}), Packet{Flow: f4(1, 0), Kind: KindQuery, ICMPType: 8, ID: 7}},
		{"ipv4 icmp timestamp reply", ser(t, ip4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(14, 0), Id: 9}), Packet{Flow: f4(1, 0), Kind: KindQueryReply, ICMPType: 14, ID: 9}},
		{"ipv4 icmp router advertisement", ser(t, ip4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(9, 0)}), Packet{Flow: f4(1, 0), Kind: KindQuery, ICMPType: 9}},
		{"ipv4 icmp echo reply", ser(t, ip4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(0, 0)}), Packet{Flow: f4(1, 0), Kind: KindQueryReply}},
		{"ipv4 icmp unreachable", ser(t, ip4(layers.IPProtocolICMPv4), &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 3)}, gopacket.Payload(syn[:28])), Packet{Flow: f4(1, 0), Kind: KindError, ICMPType: 3}},
		{"ipv4 gre", ser(t, ip4(layers.IPProtocolGRE), gopacket.Payload{0, 0, 8, 0}), Packet{Flow: f4(47, 0), Kind: KindQuery}},
		{"ipv6 tcp syn", ser(t, v6tcp, tcpSeg(40000, 8080, true, false, v6tcp)), Packet{Flow: f6(policy.TCP, 8080), SrcPort: 40000, Kind: KindPorts, TCPFlags: tcpSYN}},
		{"ipv6 udp", ser(t, v6udp, udp6, gopacket.Payload("x")), Packet{Flow: f6(policy.UDP, 9000), SrcPort: 40000, Kind: KindPorts}},
		{"ipv6 sctp", ser(t, ip6(layers.IPProtocolSCTP), sctpPayload(1, 2, 1)), Packet{Flow: f6(policy.SCTP, 2), SrcPort: 1, Kind: KindPorts, SCTPChunk: 1}},
		{"ipv6 echo", icmp6(t, 128, gopacket.Payload{0, 1, 0, 1}), Packet{Flow: f6(58, 0), Kind: KindQuery, ICMPType: 128, ID: 1}},
		{"ipv6 echo reply", icmp6(t, 129, gopacket.Payload{0, 1, 0, 1}), Packet{Flow: f6(58, 0), Kind: KindQueryReply, ICMPType: 129, ID: 1}},
		{"ipv6 unassigned type 100", icmp6(t, 100, gopacket.Payload{1, 2, 3, 4}), Packet{Flow: f6(58, 0), Kind: KindQuery, ICMPType: 100}},
		{"ipv6 neighbor solicitation", icmp6(t, 135, gopacket.Payload(make([]byte, 20))), Packet{Flow: f6(58, 0), Kind: KindND, ICMPType: 135}},
		{"ipv6 router advertisement", icmp6(t, 134, gopacket.Payload(make([]byte, 12))), Packet{Flow: f6(58, 0), Kind: KindND, ICMPType: 134}},
		{"ipv6 packet too big", icmp6(t, 2, gopacket.Payload(make([]byte, 48))), Packet{Flow: f6(58, 0), Kind: KindError, ICMPType: 2}},
	}
	// IPv6 with hop-by-hop (router alert, as MLD carries), destination options, then TCP.
	hbh := []byte{byte(layers.IPProtocolIPv6Destination), 0, 5, 2, 0, 0, 1, 0}
	dst := []byte{byte(layers.IPProtocolTCP), 0, 1, 4, 0, 0, 0, 0}
	tcpb := make([]byte, 20)
	binary.BigEndian.PutUint16(tcpb[0:], 1234)
	binary.BigEndian.PutUint16(tcpb[2:], 443)
	tcpb[12], tcpb[13] = 5<<4, tcpSYN
	cases = append(cases, decodeCase{"ipv6 hbh+dstopts tcp", raw6(layers.IPProtocolIPv6HopByHop, hbh, dst, tcpb),
		Packet{Flow: f6(policy.TCP, 443), SrcPort: 1234, Kind: KindPorts, TCPFlags: tcpSYN}})
	// IPv6 MLD report with hop-by-hop.
	mld := []byte{143, 0, 0, 0, 0, 0, 0, 0}
	hbh2 := []byte{byte(layers.IPProtocolICMPv6), 0, 5, 2, 0, 0, 1, 0}
	cases = append(cases, decodeCase{"ipv6 mld report", raw6(layers.IPProtocolIPv6HopByHop, hbh2, mld),
		Packet{Flow: f6(58, 0), Kind: KindND, ICMPType: 143}})
	// Neighbour solicitation to a solicited-node multicast address with hop limit 255: stays
	// on the link.
	ns := raw6(layers.IPProtocolICMPv6, []byte{135, 0, 0, 0, 0, 0, 0, 0})
	ns[7] = 255
	copy(ns[24:], netip.MustParseAddr("ff02::1:ff00:1").AsSlice())
	cases = append(cases, decodeCase{"ipv6 neighbour solicitation on the link", ns,
		Packet{Flow: policy.Flow{Src: a6, Dst: netip.MustParseAddr("ff02::1:ff00:1"), Proto: 58}, Kind: KindND, ICMPType: 135, HopLimit: 255, LinkScope: true}})
	// IPv6 routing header, then UDP.
	rt := []byte{byte(layers.IPProtocolUDP), 0, 0, 0, 0, 0, 0, 0}
	udpb := []byte{0x9c, 0x40, 0x23, 0x28, 0, 8, 0, 0}
	cases = append(cases, decodeCase{"ipv6 routing udp", raw6(layers.IPProtocolIPv6Routing, rt, udpb),
		Packet{Flow: f6(policy.UDP, 9000), SrcPort: 40000, Kind: KindPorts}})
	// IPv6 fragments: the first (offset 0, more) carries the ports; a later one does not.
	fragFirst := []byte{byte(layers.IPProtocolUDP), 0, 0, 1, 0, 0, 0, 42}
	cases = append(cases, decodeCase{"ipv6 first fragment", raw6(layers.IPProtocolIPv6Fragment, fragFirst, udpb),
		Packet{Flow: f6(policy.UDP, 9000), SrcPort: 40000, Kind: KindPorts, FirstFragment: true}})
	fragLater := []byte{byte(layers.IPProtocolUDP), 0, 0x05, 0x28, 0, 0, 0, 42} // offset 165*8
	cases = append(cases, decodeCase{"ipv6 later fragment", raw6(layers.IPProtocolIPv6Fragment, fragLater, []byte("payload!")),
		Packet{Flow: f6(policy.UDP, 0), Kind: KindFragment}})
	// IPv4 fragments.
	first := ip4(layers.IPProtocolUDP)
	first.Flags = layers.IPv4MoreFragments
	cases = append(cases, decodeCase{"ipv4 first fragment", ser(t, first, gopacket.Payload(udpb), gopacket.Payload("more")),
		Packet{Flow: f4(policy.UDP, 9000), SrcPort: 40000, Kind: KindPorts, FirstFragment: true}})
	later := ip4(layers.IPProtocolUDP)
	later.FragOffset = 100
	cases = append(cases, decodeCase{"ipv4 later fragment", ser(t, later, gopacket.Payload("data data")),
		Packet{Flow: f4(policy.UDP, 0), Kind: KindFragment}})
	// Malformed.
	mal := Packet{Kind: KindMalformed}
	cases = append(cases,
		decodeCase{"empty", nil, mal},
		decodeCase{"version 5", []byte{0x50, 0, 0, 20}, mal},
		decodeCase{"ipv4 short", syn[:12], mal},
		decodeCase{"ipv4 tcp cut in header", syn[:20+10], mal},
		decodeCase{"ipv4 ihl 3", append([]byte{0x43}, syn[1:]...), mal},
		decodeCase{"ipv6 short", raw6(layers.IPProtocolTCP)[:30], mal},
		decodeCase{"ipv6 tcp missing", raw6(layers.IPProtocolTCP), mal},
		decodeCase{"ipv6 ext header overruns", raw6(layers.IPProtocolIPv6Destination, []byte{6, 9, 0, 0}), mal},
	)
	return cases
}

func icmp6(t testing.TB, typ uint8, body gopacket.Payload) []byte {
	nw := ip6(layers.IPProtocolICMPv6)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, 0)}
	_ = ic.SetNetworkLayerForChecksum(nw)
	return ser(t, nw, ic, body)
}

// raw6 assembles an IPv6 packet from a first next-header value and raw header bytes.
func raw6(next layers.IPProtocol, parts ...[]byte) []byte {
	b := make([]byte, 40)
	b[0] = 0x60
	b[6] = byte(next)
	b[7] = 64
	copy(b[8:], a6.AsSlice())
	copy(b[24:], b6.AsSlice())
	for _, p := range parts {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	return b
}

func TestDecode(t *testing.T) {
	d := NewDecoder()
	for _, c := range decodeCases(t) {
		t.Run(c.name, func(t *testing.T) {
			var p Packet
			d.Decode(c.data, &p)
			want := c.want
			if want.Kind == KindMalformed {
				if p.Kind != KindMalformed {
					t.Fatalf("got %+v, want malformed", p)
				}
				return
			}
			if c.want.Kind == KindQueryReply && c.want.ICMPType == 0 {
				want.ICMPType = p.ICMPType
			}
			if want.HopLimit == 0 {
				want.HopLimit = 64 // every test packet is built with TTL / hop limit 64
			}
			if p != want {
				t.Fatalf("got  %+v\nwant %+v", p, want)
			}
		})
	}
}

func TestDecodeTruncatedCaptureStillHasPorts(t *testing.T) {
	// The kernel copies only the first CopyRange bytes; a big segment must still decode.
	v4 := ip4(layers.IPProtocolTCP)
	data := ser(t, v4, tcpSeg(1, 2, false, true, v4), gopacket.Payload(make([]byte, 1400)))
	var p Packet
	NewDecoder().Decode(data[:HeaderBytes], &p)
	if p.Kind != KindPorts || p.Flow.Port != 2 || p.SrcPort != 1 {
		t.Fatalf("truncated capture: %+v", p)
	}
	v6 := ip6(layers.IPProtocolTCP)
	data = ser(t, v6, tcpSeg(1, 2, false, true, v6), gopacket.Payload(make([]byte, 1400)))
	NewDecoder().Decode(data[:HeaderBytes], &p)
	if p.Kind != KindPorts || p.Flow.Port != 2 {
		t.Fatalf("truncated v6 capture: %+v", p)
	}
}

func TestDecodeAllocatesNothing(t *testing.T) {
	d := NewDecoder()
	var p Packet
	for _, c := range decodeCases(t) {
		if c.want.Kind == KindMalformed {
			continue // errors are built by gopacket with fmt; malformed packets are the cold path
		}
		d.Decode(c.data, &p) // warm: gopacket grows its TCP option slice once
		if n := testing.AllocsPerRun(100, func() { d.Decode(c.data, &p) }); n != 0 {
			t.Errorf("%s: %v allocations per decode", c.name, n)
		}
	}
}

func TestOpeningAndReverse(t *testing.T) {
	p := Packet{Flow: policy.Flow{Src: a4, Dst: b4, Proto: policy.TCP, Port: 80}, SrcPort: 40000, Kind: KindPorts}
	for flags, want := range map[uint8]bool{tcpSYN: true, tcpSYN | tcpACK: false, tcpACK: false, tcpFIN | tcpACK: false, tcpRST: false} {
		p.TCPFlags = flags
		if p.Opening() != want {
			t.Errorf("flags %#x: opening %v, want %v", flags, !want, want)
		}
	}
	if r := p.Reverse(); r != (policy.Flow{Src: b4, Dst: a4, Proto: policy.TCP, Port: 40000}) {
		t.Errorf("reverse %+v", r)
	}
	u := Packet{Flow: policy.Flow{Proto: policy.UDP}, Kind: KindPorts}
	if !u.Opening() {
		t.Error("udp must count as opening")
	}
	s := Packet{Flow: policy.Flow{Proto: policy.SCTP}, Kind: KindPorts, SCTPChunk: 0}
	if s.Opening() {
		t.Error("sctp data chunk must not count as opening")
	}
}

func FuzzDecode(f *testing.F) {
	for _, c := range decodeCases(f) {
		f.Add(c.data)
	}
	d := NewDecoder()
	f.Fuzz(func(t *testing.T, data []byte) {
		var p Packet
		d.Decode(data, &p)
		switch p.Kind {
		case KindPorts, KindQuery, KindQueryReply, KindError, KindND, KindFragment:
			if !p.Flow.Src.IsValid() || !p.Flow.Dst.IsValid() {
				t.Fatalf("kind %v without addresses: %+v", p.Kind, p)
			}
			if p.Flow.Src.Is4() != (data[0]>>4 == 4) {
				t.Fatalf("address family does not match the version nibble: %+v", p)
			}
		case KindMalformed:
		default:
			t.Fatalf("unknown kind %d", p.Kind)
		}
		if p.Kind != KindPorts && (p.SrcPort != 0 || (p.Flow.Port != 0 && p.Kind != KindFragment)) {
			t.Fatalf("ports on a %v packet: %+v", p.Kind, p)
		}
	})
}
