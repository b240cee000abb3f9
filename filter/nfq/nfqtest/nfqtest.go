// Package nfqtest has the helpers of the real-queue tests (filter/nfq, filter/queue): UDP
// endpoints inside lab namespaces that send and count datagrams without allocating, so that a
// test can count the process's mallocs around the packets it sends.
package nfqtest

import (
	"net/netip"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluice-dev/sluice/internal/netlab"
)

// RequireLab skips the test unless it can build a lab and install kernel rules.
func RequireLab(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, iptables and NFQUEUE")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("iptables is missing: run hack/deps.sh")
	}
}

// Sender is a UDP socket in host h connected to dst:port; writes go through the node. It is
// closed when the test ends.
func Sender(t *testing.T, h *netlab.Host, dst netip.Addr, port int) int {
	t.Helper()
	var fd int
	err := h.Do(func() (err error) {
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: dst.As4()})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// Sink counts the datagrams that reach port on host h until the test ends. Its reader
// allocates nothing.
func Sink(t *testing.T, h *netlab.Host, port int) *atomic.Uint64 {
	t.Helper()
	var fd int
	err := h.Do(func() (err error) {
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
		return unix.Bind(fd, &unix.SockaddrInet4{Port: port})
	})
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Uint64
	var stop atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for !stop.Load() {
			if _, err := unix.Read(fd, buf); err != nil {
				if err == unix.EINTR {
					continue
				}
				return
			}
			if !stop.Load() {
				n.Add(1)
			}
		}
	}()
	t.Cleanup(func() {
		stop.Store(true)
		unix.Shutdown(fd, unix.SHUT_RDWR) // wakes the blocked read (it returns 0)
		<-done
		unix.Close(fd)
	})
	return &n
}
