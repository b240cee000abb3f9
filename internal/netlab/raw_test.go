package netlab

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

// A packet forged in one pod (a source address nobody owns) crosses the node and is seen, with
// that source, by a capture in the other; and what is not sent is not seen.
func TestInjectAndCapture(t *testing.T) {
	_, a, b := twoPods(t)
	forged := netip.MustParseAddr("10.244.9.9")
	tok := []byte("netlab-inject-token")
	c, err := b.Capture(func(p []byte) bool { return bytes.Contains(p, tok) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	other, err := b.Capture(func(p []byte) bool { return bytes.Contains(p, []byte("never-sent")) })
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for _, build := range []func() ([]byte, error){
		func() ([]byte, error) {
			return UDPPacket(netip.AddrPortFrom(forged, 4000), netip.AddrPortFrom(b4, 53), tok)
		},
		func() ([]byte, error) { return ICMPPacket(a6, b6, 100, 0, append(make([]byte, 4), tok...), 0) },
		func() ([]byte, error) {
			return Segment{Src: netip.AddrPortFrom(a4, 4000), Dst: netip.AddrPortFrom(b4, 80), ACK: true, MD5: true, Payload: tok}.Bytes()
		},
	} {
		p, err := build()
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Inject(p); err != nil {
			t.Fatal(err)
		}
	}
	// More may match: b's echo of the UDP datagram comes back as the node's ICMP error (no
	// route to the forged source), quoting the token.
	if n := c.Wait(3, 3*time.Second); n < 3 {
		t.Fatalf("captured %d of the 3 injected packets", n)
	}
	if got := c.Packets()[0]; !bytes.Equal(got[12:16], forged.AsSlice()) {
		t.Errorf("the forged UDP packet arrived from %v, want %v", netip.AddrFrom4([4]byte(got[12:16])), forged)
	}
	if n := other.Wait(1, 200*time.Millisecond); n != 0 {
		t.Errorf("a capture matched %d packets that were never sent", n)
	}
}

func TestFloodUDPBounds(t *testing.T) {
	_, a, _ := twoPods(t)
	if _, err := a.FloodUDP(Flood{Dst: b4, Ports: 10}); err == nil {
		t.Error("a flood without MaxPackets and MaxDuration was accepted")
	}
	sent, err := a.FloodUDP(Flood{Dst: b4, FirstPort: 9000, Ports: 100, MaxPackets: 1000, MaxDuration: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if sent != 1000 {
		t.Errorf("sent %d datagrams, want exactly MaxPackets=1000", sent)
	}
	start := time.Now()
	sent, err = a.FloodUDP(Flood{Dst: b4, FirstPort: 9000, Ports: 100, Rate: 1000, MaxPackets: 1_000_000, MaxDuration: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3*time.Second || sent > 1000 {
		t.Errorf("a 300 ms flood at 1000/s sent %d datagrams in %s", sent, took)
	}
}
