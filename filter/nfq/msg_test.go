package nfq

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"reflect"
	"testing"
)

// kernelMsg builds a netlink message the way the kernel lays one out, from explicit parts, so the
// decoder is checked against bytes written independently of the encoder.
type kernelMsg struct {
	typ   uint16
	queue uint16
	attrs [][2][]byte // type (2 bytes, host order), value
}

func (k kernelMsg) attr(typ uint16, v []byte) kernelMsg {
	t := make([]byte, 2)
	binary.NativeEndian.PutUint16(t, typ)
	k.attrs = append(k.attrs, [2][]byte{t, v})
	return k
}

func (k kernelMsg) bytes() []byte {
	var body []byte
	body = append(body, 2, 0) // AF_INET, version 0
	body = binary.BigEndian.AppendUint16(body, k.queue)
	for _, a := range k.attrs {
		l := 4 + len(a[1])
		body = binary.NativeEndian.AppendUint16(body, uint16(l))
		body = append(body, a[0]...)
		body = append(body, a[1]...)
		for len(body)%4 != 0 {
			body = append(body, 0)
		}
	}
	h := make([]byte, 16)
	binary.NativeEndian.PutUint32(h[0:], uint32(16+len(body)))
	binary.NativeEndian.PutUint16(h[4:], k.typ)
	binary.NativeEndian.PutUint32(h[8:], 0)
	return append(h, body...)
}

func be32b(x uint32) []byte { return binary.BigEndian.AppendUint32(nil, x) }

func packetHdr(id uint32, proto uint16, hook uint8) []byte {
	b := be32b(id)
	b = binary.BigEndian.AppendUint16(b, proto)
	return append(b, hook)
}

func samplePacket() (kernelMsg, []byte) {
	payload := bytes.Repeat([]byte{0x45, 0xaa, 0x01}, 50) // 150 bytes: not a multiple of 4
	return kernelMsg{typ: msgPacket, queue: 100}.
		attr(attrPacketHdr, packetHdr(0xdeadbeef, 0x0800, 2)).
		attr(attrMark, be32b(7)).
		attr(attrInDev, be32b(3)).
		attr(attrOutDev, be32b(4)).
		attr(12 /* NFQA_CT_INFO, not read */, be32b(2)).
		attr(attrPayload, payload).
		attr(attrCapLen, be32b(1500)).
		attr(attrSkbInfo, be32b(SkbGSO|SkbCsumNotReady)), payload
}

func TestParsePacket(t *testing.T) {
	k, payload := samplePacket()
	raw := k.bytes()
	typ, body, rest, ok := nextMessage(raw)
	if !ok || typ != msgPacket || len(rest) != 0 {
		t.Fatalf("nextMessage = %#x, %d bytes, rest %d, %v", typ, len(body), len(rest), ok)
	}
	var p Packet
	if err := parsePacket(body, &p); err != nil {
		t.Fatal(err)
	}
	want := Packet{Queue: 100, ID: 0xdeadbeef, HWProto: 0x0800, Hook: 2, Mark: 7, InDev: 3, OutDev: 4,
		CapLen: 1500, SkbInfo: SkbGSO | SkbCsumNotReady}
	got := p
	got.Payload = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parsed %+v\nwant   %+v", got, want)
	}
	if !bytes.Equal(p.Payload, payload) {
		t.Errorf("payload %x, want %x", p.Payload, payload)
	}
	// The payload is a view into the receive buffer, not a copy.
	if &p.Payload[0] != &raw[bytes.Index(raw, payload)] {
		t.Error("payload was copied out of the buffer")
	}
	// A nested-flag bit in the type must not hide an attribute.
	k2 := kernelMsg{typ: msgPacket, queue: 1}.attr(attrPacketHdr|0x8000, packetHdr(9, 0x86dd, 1))
	_, body, _, _ = nextMessage(k2.bytes())
	if err := parsePacket(body, &p); err != nil || p.ID != 9 || p.HWProto != 0x86dd || p.Payload != nil {
		t.Errorf("flagged header: %+v, %v", p, err)
	}
}

func TestParsePacketRejectsMalformed(t *testing.T) {
	good, _ := samplePacket()
	raw := good.bytes()
	_, body, _, _ := nextMessage(raw)
	cases := map[string][]byte{
		"empty body":        {},
		"short nfgenmsg":    {2, 0, 0},
		"no packet header":  kernelMsg{typ: msgPacket}.attr(attrPayload, []byte{1, 2, 3, 4}).bytes()[16:],
		"short header attr": kernelMsg{typ: msgPacket}.attr(attrPacketHdr, []byte{0, 0, 0, 1, 8, 0}).bytes()[16:],
		"attribute past the end": func() []byte {
			b := append([]byte(nil), body...)
			binary.NativeEndian.PutUint16(b[4:], 0x7ff0) // first attribute claims 32 KiB
			return b
		}(),
		"attribute length below its header": func() []byte {
			b := append([]byte(nil), body...)
			binary.NativeEndian.PutUint16(b[4:], 2)
			return b
		}(),
	}
	for name, b := range cases {
		var p Packet
		if err := parsePacket(b, &p); err == nil {
			t.Errorf("%s: parsed without error: %+v", name, p)
		}
	}
	// A cut-off message is not a message.
	for _, n := range []int{0, 10, 16, len(raw) - 1} {
		if _, _, _, ok := nextMessage(raw[:n]); ok {
			t.Errorf("nextMessage accepted %d of %d bytes", n, len(raw))
		}
	}
	lying := append([]byte(nil), raw...)
	binary.NativeEndian.PutUint32(lying[0:], 8) // shorter than a header
	if _, _, _, ok := nextMessage(lying); ok {
		t.Error("nextMessage accepted a length below the header size")
	}
}

func TestSeveralMessagesInOneBuffer(t *testing.T) {
	a, _ := samplePacket()
	b := kernelMsg{typ: msgPacket, queue: 100}.attr(attrPacketHdr, packetHdr(2, 0x0800, 2)).attr(attrPayload, []byte{0x45, 1, 2})
	buf := append(a.bytes(), b.bytes()...)
	var ids []uint32
	for rest := buf; ; {
		typ, body, r, ok := nextMessage(rest)
		if !ok {
			break
		}
		rest = r
		var p Packet
		if typ != msgPacket || parsePacket(body, &p) != nil {
			t.Fatalf("message %d did not parse", len(ids))
		}
		ids = append(ids, p.ID)
	}
	if len(ids) != 2 || ids[0] != 0xdeadbeef || ids[1] != 2 {
		t.Errorf("ids %x", ids)
	}
}

func TestVerdictEncoding(t *testing.T) {
	b := make([]byte, verdictLen)
	if n := putVerdict(b, 100, 0x01020304, Accept, false, false, 0); n != 32 {
		t.Fatalf("length %d", n)
	}
	// nlmsghdr (host order) | nfgenmsg | nlattr NFQA_VERDICT_HDR { be32 verdict, be32 id }
	want := binary.NativeEndian.AppendUint32(nil, 32)
	want = binary.NativeEndian.AppendUint16(want, 3<<8|1)
	want = binary.NativeEndian.AppendUint16(want, 1)
	want = append(want, make([]byte, 8)...)
	want = append(want, 0, 0, 0, 100)
	want = binary.NativeEndian.AppendUint16(want, 12)
	want = binary.NativeEndian.AppendUint16(want, 2)
	want = append(want, 0, 0, 0, 1, 1, 2, 3, 4)
	if !bytes.Equal(b, want) {
		t.Errorf("verdict\n got %s\nwant %s", hex.EncodeToString(b), hex.EncodeToString(want))
	}
	putVerdict(b, 7, 9, Drop, true, false, 0)
	if typ := binary.NativeEndian.Uint16(b[4:]); typ != 3<<8|3 {
		t.Errorf("batch verdict type %#x", typ)
	}
	if v, id := binary.BigEndian.Uint32(b[24:]), binary.BigEndian.Uint32(b[28:]); v != 0 || id != 9 {
		t.Errorf("batch verdict %d for id %d", v, id)
	}
	// With a mark: NFQA_MARK (3) follows the verdict header, and the length covers it.
	m := make([]byte, maxVerdictLen)
	if n := putVerdict(m, 7, 9, Repeat, false, true, 0x10203040); n != 40 || binary.NativeEndian.Uint32(m) != 40 {
		t.Fatalf("verdict with mark: %d bytes, length field %d", n, binary.NativeEndian.Uint32(m))
	}
	if l, typ, mark := binary.NativeEndian.Uint16(m[32:]), binary.NativeEndian.Uint16(m[34:]), binary.BigEndian.Uint32(m[36:]); l != 8 || typ != 3 || mark != 0x10203040 {
		t.Errorf("mark attribute len %d type %d mark %#x", l, typ, mark)
	}
	if v := binary.BigEndian.Uint32(m[24:]); v != 4 {
		t.Errorf("verdict %d, want NF_REPEAT", v)
	}
}

func TestConfigEncoding(t *testing.T) {
	c := configMsg{queue: 0x1234, seq: 5, cmd: cmdBind, setParams: true, copyRange: 160, maxQueueLen: 4096,
		flags: FlagFailOpen | FlagGSO}
	b := c.encode()
	if l := binary.NativeEndian.Uint32(b); int(l) != len(b) || len(b)%4 != 0 {
		t.Fatalf("length field %d, message %d bytes", l, len(b))
	}
	if typ, fl, seq := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint16(b[6:]), binary.NativeEndian.Uint32(b[8:]); typ != 3<<8|2 || fl != 5 || seq != 5 {
		t.Errorf("header type %#x flags %#x seq %d", typ, fl, seq)
	}
	if q := binary.BigEndian.Uint16(b[18:]); q != 0x1234 {
		t.Errorf("queue %#x", q)
	}
	attrs := map[uint16][]byte{}
	for a := b[20:]; len(a) >= 4; {
		l := int(binary.NativeEndian.Uint16(a))
		attrs[binary.NativeEndian.Uint16(a[2:])] = a[4:l]
		a = a[(l+3)&^3:]
	}
	want := map[uint16][]byte{
		cfgCmd:    {1, 0, 0, 2},
		cfgParams: {0, 0, 0, 160, 2}, // packed: be32 range, then the mode
		cfgMaxLen: {0, 0, 0x10, 0},
		cfgFlags:  {0, 0, 0, 5},
		cfgMask:   {0, 0, 0, 7},
	}
	for k, v := range want {
		if !bytes.Equal(attrs[k], v) {
			t.Errorf("attribute %d = %v, want %v", k, attrs[k], v)
		}
	}
	if len(attrs) != len(want) {
		t.Errorf("attributes %v", attrs)
	}
}

func TestParseError(t *testing.T) {
	body := binary.NativeEndian.AppendUint32(nil, uint32(0xffffffff-16+1)) // -16 (EBUSY)
	h := make([]byte, 16)
	binary.NativeEndian.PutUint32(h[8:], 42)
	body = append(body, h...)
	errno, seq, ok := parseError(body)
	if !ok || errno != 16 || seq != 42 {
		t.Errorf("parseError = %d, %d, %v", errno, seq, ok)
	}
	if _, _, ok := parseError(body[:10]); ok {
		t.Error("short error body accepted")
	}
}

// The decode and encode steps of the packet path allocate nothing.
func TestDecodeEncodeAllocatesNothing(t *testing.T) {
	k, _ := samplePacket()
	raw := k.bytes()
	var p Packet
	out := make([]byte, maxVerdictLen)
	allocs := testing.AllocsPerRun(1000, func() {
		_, body, _, _ := nextMessage(raw)
		if parsePacket(body, &p) != nil {
			panic("parse")
		}
		putVerdict(out, p.Queue, p.ID, Accept, false, true, p.Mark|1)
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per message", allocs)
	}
}

func FuzzParsePacket(f *testing.F) {
	k, _ := samplePacket()
	f.Add(k.bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		for rest := b; ; {
			_, body, r, ok := nextMessage(rest)
			if !ok {
				return
			}
			if len(r) >= len(rest) {
				t.Fatal("nextMessage did not advance")
			}
			rest = r
			var p Packet
			if parsePacket(body, &p) == nil && len(p.Payload) > len(body) {
				t.Fatal("payload longer than its message")
			}
		}
	})
}
