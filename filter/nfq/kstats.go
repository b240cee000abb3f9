package nfq

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// KernelStats are the kernel's own counters of one queue (/proc/net/netfilter/nfnetlink_queue).
type KernelStats struct {
	Queue    uint16
	PortID   uint32 // netlink port of the bound socket
	Waiting  uint64 // packets waiting for a verdict now
	CopyMode uint8
	CopyLen  uint32
	// QueueDropped counts packets that found the queue full (accepted instead with
	// FlagFailOpen); UserDropped, packets the socket could not take (its buffer full; also
	// accepted with FlagFailOpen, so then they are not counted here).
	QueueDropped uint64
	UserDropped  uint64
	IDSequence   uint32 // id of the last packet queued
}

// ReadKernelStats reads the counters of every queue bound in the calling thread's network
// namespace. A missing file (the module not loaded yet: no queue was ever bound) is no queues.
func ReadKernelStats() ([]KernelStats, error) {
	// thread-self: a thread that entered another namespace (netlab's Do) sees that one.
	const path = "/proc/thread-self/net/netfilter/nfnetlink_queue"
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read the kernel's queue counters: %w", err)
	}
	defer f.Close()
	var out []KernelStats
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 {
			return nil, fmt.Errorf("%s line %d: %d fields, want at least 8", path, line, len(fs))
		}
		var v [8]uint64
		for i := range v {
			x, err := strconv.ParseUint(fs[i], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("%s line %d field %d: %w", path, line, i+1, err)
			}
			v[i] = x
		}
		out = append(out, KernelStats{Queue: uint16(v[0]), PortID: uint32(v[1]), Waiting: v[2],
			CopyMode: uint8(v[3]), CopyLen: uint32(v[4]), QueueDropped: v[5], UserDropped: v[6], IDSequence: uint32(v[7])})
	}
	return out, sc.Err()
}
