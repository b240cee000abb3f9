// Package nfq is sluice's own NFQUEUE socket: the netfilter queue netlink protocol spoken over a
// plain AF_NETLINK socket (golang.org/x/sys/unix), with a receive loop and verdicts that
// allocate nothing per packet.
//
// It exists because the per-packet cost of github.com/florianl/go-nfqueue (through
// mdlayher/netlink) was measured at 2.6 times the C floor (libnetfilter_queue) on the same
// machine: a MSG_PEEK receive and a second receive per message, a netpoller park and wake per
// packet, a write deadline and several allocations per message and per verdict (see
// bench/ANALYSIS.md for the figures). This package keeps exactly the parts of the protocol the
// agent uses: bind one queue, configure it (copy mode and range, queue length, FAIL_OPEN and
// GSO), receive packet messages, send verdicts.
//
// The wire format (include/uapi/linux/netfilter/nfnetlink_queue.h): every message is a
// netlink header in host byte order, a 4-byte nfgenmsg (family, version, queue number in big
// endian), then netlink attributes whose payloads are in network byte order.
package nfq

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol numbers from the kernel's uapi headers (linux/netlink.h, linux/netfilter/*.h).
const (
	nlmsgHdrLen = 16
	nfgenLen    = 4
	attrHdrLen  = 4

	nlmsgError = 2 // NLMSG_ERROR
	nlmsgDone  = 3 // NLMSG_DONE

	nlmFRequest = 0x1 // NLM_F_REQUEST
	nlmFAck     = 0x4 // NLM_F_ACK

	subsysQueue = 3 // NFNL_SUBSYS_QUEUE

	msgPacket       = subsysQueue<<8 | 0 // NFQNL_MSG_PACKET
	msgVerdict      = subsysQueue<<8 | 1 // NFQNL_MSG_VERDICT
	msgConfig       = subsysQueue<<8 | 2 // NFQNL_MSG_CONFIG
	msgVerdictBatch = subsysQueue<<8 | 3 // NFQNL_MSG_VERDICT_BATCH

	// Packet message attributes (enum nfqnl_attr_type).
	attrPacketHdr  = 1
	attrVerdictHdr = 2
	attrMark       = 3
	attrInDev      = 5
	attrOutDev     = 6
	attrPayload    = 10
	attrCapLen     = 13
	attrSkbInfo    = 14

	// Config message attributes (enum nfqnl_attr_config).
	cfgCmd      = 1
	cfgParams   = 2
	cfgMaxLen   = 3
	cfgMask     = 4
	cfgFlags    = 5
	cmdBind     = 1 // NFQNL_CFG_CMD_BIND
	cmdUnbind   = 2 // NFQNL_CFG_CMD_UNBIND
	copyPacket  = 2 // NFQNL_COPY_PACKET
	nlaTypeMask = 0x3fff

	// verdictLen is the size of one encoded verdict message: header, nfgenmsg, one attribute
	// holding nfqnl_msg_verdict_hdr; markLen, the NFQA_MARK attribute a verdict may carry.
	verdictLen    = nlmsgHdrLen + nfgenLen + attrHdrLen + 8
	markLen       = attrHdrLen + 4
	maxVerdictLen = verdictLen + markLen
)

// Queue flags (NFQA_CFG_F_*).
const (
	FlagFailOpen  uint32 = 1 // accept instead of dropping when the queue or the socket is full
	FlagConntrack uint32 = 2
	FlagGSO       uint32 = 4 // take GSO packets whole instead of having the kernel segment them
)

// Flags of Packet.SkbInfo (NFQA_SKB_*).
const (
	SkbCsumNotReady    uint32 = 1
	SkbGSO             uint32 = 2
	SkbCsumNotVerified uint32 = 4
)

// Verdict is what the kernel does with a queued packet.
type Verdict uint32

const (
	Drop   Verdict = 0 // NF_DROP
	Accept Verdict = 1 // NF_ACCEPT
	// Repeat re-runs the hook, so the packet is judged (and queued) again from the start.
	Repeat Verdict = 4 // NF_REPEAT
)

// Packet is one queued packet as the kernel described it. Payload points into the reader's
// receive buffer: it is valid only until the handler returns.
type Packet struct {
	Queue   uint16
	ID      uint32
	HWProto uint16 // EtherType of the packet: 0x0800 IPv4, 0x86dd IPv6
	Hook    uint8  // netfilter hook (NF_INET_*)
	Mark    uint32
	InDev   uint32 // interface indexes; 0 when absent
	OutDev  uint32
	// CapLen is the packet's full length when the kernel copied only the first CopyRange bytes;
	// 0 when Payload is the whole packet.
	CapLen  uint32
	SkbInfo uint32 // SkbGSO, SkbCsumNotReady, SkbCsumNotVerified
	Payload []byte

	// The mark the verdict sets (SetMark); the packet keeps its own otherwise.
	newMark uint32
	setMark bool
}

// SetMark makes the verdict for p set the packet's mark to m (NFQA_MARK in the verdict), so
// that rules after the queue, or a repeated hook, can tell the packet was judged.
func (p *Packet) SetMark(m uint32) { p.newMark, p.setMark = m, true }

var native = binary.NativeEndian

// errMalformed is returned for messages whose lengths do not add up.
var errMalformed = errors.New("malformed netlink message")

// nextMessage splits the first netlink message off buf. It reports false when buf holds no
// whole message (a truncated or lying length ends the buffer: nothing after it can be trusted).
func nextMessage(buf []byte) (typ uint16, body, rest []byte, ok bool) {
	if len(buf) < nlmsgHdrLen {
		return 0, nil, nil, false
	}
	n := int(native.Uint32(buf[0:4]))
	if n < nlmsgHdrLen || n > len(buf) {
		return 0, nil, nil, false
	}
	typ = native.Uint16(buf[4:6])
	body = buf[nlmsgHdrLen:n]
	adv := align4(n)
	if adv > len(buf) {
		adv = len(buf)
	}
	return typ, body, buf[adv:], true
}

func align4(n int) int { return (n + 3) &^ 3 }

// parsePacket decodes the body of an NFQNL_MSG_PACKET message (after the netlink header) into
// p. Payload keeps pointing into body. It fails on a body too short for its nfgenmsg, on an
// attribute whose length runs past the message, and when the packet header (the id a verdict
// needs) is missing.
func parsePacket(body []byte, p *Packet) error {
	if len(body) < nfgenLen {
		return errMalformed
	}
	*p = Packet{Queue: binary.BigEndian.Uint16(body[2:4])}
	b := body[nfgenLen:]
	seenHdr := false
	for len(b) >= attrHdrLen {
		l := int(native.Uint16(b[0:2]))
		typ := native.Uint16(b[2:4]) & nlaTypeMask
		if l < attrHdrLen || l > len(b) {
			return errMalformed
		}
		v := b[attrHdrLen:l]
		switch typ {
		case attrPacketHdr:
			if len(v) < 7 {
				return errMalformed
			}
			p.ID = binary.BigEndian.Uint32(v[0:4])
			p.HWProto = binary.BigEndian.Uint16(v[4:6])
			p.Hook = v[6]
			seenHdr = true
		case attrPayload:
			p.Payload = v
		case attrMark:
			p.Mark = be32(v)
		case attrInDev:
			p.InDev = be32(v)
		case attrOutDev:
			p.OutDev = be32(v)
		case attrCapLen:
			p.CapLen = be32(v)
		case attrSkbInfo:
			p.SkbInfo = be32(v)
		}
		a := align4(l)
		if a > len(b) {
			a = len(b)
		}
		b = b[a:]
	}
	if !seenHdr {
		return errMalformed
	}
	return nil
}

func be32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}

// parseError reads the errno of an NLMSG_ERROR body (0 for an acknowledgement) and the sequence
// number of the request it answers.
func parseError(body []byte) (errno int32, seq uint32, ok bool) {
	if len(body) < 4+nlmsgHdrLen {
		return 0, 0, false
	}
	return -int32(native.Uint32(body[0:4])), native.Uint32(body[4+8 : 4+12]), true
}

// putHeader writes a netlink header and an nfgenmsg for queue at the start of b.
func putHeader(b []byte, length int, typ, flags uint16, seq uint32, queue uint16) {
	native.PutUint32(b[0:4], uint32(length))
	native.PutUint16(b[4:6], typ)
	native.PutUint16(b[6:8], flags)
	native.PutUint32(b[8:12], seq)
	native.PutUint32(b[12:16], 0) // port id: the kernel fills in ours
	b[16] = 0                     // AF_UNSPEC: the queue number alone names the queue
	b[17] = 0                     // NFNETLINK_V0
	binary.BigEndian.PutUint16(b[18:20], queue)
}

// putVerdict encodes one verdict message for packet id into b (at least maxVerdictLen bytes)
// and returns its length. With setMark it also sets the packet's mark. With batch, the kernel
// applies the verdict (and mark) to every packet of the queue whose id is at most id
// (NFQNL_MSG_VERDICT_BATCH).
func putVerdict(b []byte, queue uint16, id uint32, v Verdict, batch, setMark bool, mark uint32) int {
	typ := uint16(msgVerdict)
	if batch {
		typ = msgVerdictBatch
	}
	n := verdictLen
	if setMark {
		n += markLen
	}
	putHeader(b, n, typ, nlmFRequest, 0, queue)
	a := b[nlmsgHdrLen+nfgenLen:]
	native.PutUint16(a[0:2], attrHdrLen+8)
	native.PutUint16(a[2:4], attrVerdictHdr)
	binary.BigEndian.PutUint32(a[4:8], uint32(v))
	binary.BigEndian.PutUint32(a[8:12], id)
	if setMark {
		native.PutUint16(a[12:14], markLen)
		native.PutUint16(a[14:16], attrMark)
		binary.BigEndian.PutUint32(a[16:20], mark)
	}
	return n
}

// configMsg is the one configuration message Open sends: bind the queue and set everything in
// the same request, so no packet is queued under the kernel's defaults (no copy at all) between
// a bind and its parameters, and an error names the one request that failed.
type configMsg struct {
	queue       uint16
	seq         uint32
	cmd         uint8 // cmdBind, cmdUnbind or 0 (none)
	copyRange   uint32
	maxQueueLen uint32
	flags       uint32
	setParams   bool
}

func (c configMsg) encode() []byte {
	b := make([]byte, 0, 64)
	b = b[:nlmsgHdrLen+nfgenLen]
	attr := func(typ uint16, v []byte) {
		l := attrHdrLen + len(v)
		start := len(b)
		b = append(b, 0, 0, 0, 0)
		native.PutUint16(b[start:], uint16(l))
		native.PutUint16(b[start+2:], typ)
		b = append(b, v...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	u32 := func(x uint32) []byte { return binary.BigEndian.AppendUint32(nil, x) }
	if c.cmd != 0 {
		// struct nfqnl_msg_config_cmd: command, pad, pf (ignored by kernels since 3.8).
		attr(cfgCmd, []byte{c.cmd, 0, 0, 2})
	}
	if c.setParams {
		// struct nfqnl_msg_config_params is packed: copy_range then copy_mode.
		attr(cfgParams, append(u32(c.copyRange), copyPacket))
		attr(cfgMaxLen, u32(c.maxQueueLen))
		// FLAGS needs MASK; setting every flag bit we know in the mask clears the ones not
		// asked for, so a queue left configured by an earlier reader gets exactly ours.
		attr(cfgFlags, u32(c.flags))
		attr(cfgMask, u32(FlagFailOpen|FlagGSO|FlagConntrack))
	}
	putHeader(b, len(b), msgConfig, nlmFRequest|nlmFAck, c.seq, c.queue)
	return b
}

func (c configMsg) String() string {
	switch {
	case c.cmd == cmdBind:
		return fmt.Sprintf("bind NFQUEUE %d (copy %d bytes, max length %d, flags %#x)", c.queue, c.copyRange, c.maxQueueLen, c.flags)
	case c.cmd == cmdUnbind:
		return fmt.Sprintf("unbind NFQUEUE %d", c.queue)
	}
	return fmt.Sprintf("configure NFQUEUE %d", c.queue)
}
