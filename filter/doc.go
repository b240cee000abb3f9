// Package filter is sluice's packet path without the kernel: it decodes the headers of a queued
// packet, judges it against the policy snapshot in force (flow cache, return table, the verdict
// rules for packets that are not plain) and records the outcome (counters, rate-limited log
// lines written off the packet path, offload requests). It makes no system call, so its tests
// run without privileges; everything per packet is allocation-free.
//
// Its subpackages talk to the kernel:
//
//	filter/queue      NFQUEUE: binds the queues, reads packets, gives verdicts, watchdog
//	filter/rules      iptables chains and local-pod ipsets that send packets to the queues
//	filter/offload    kernel ipsets that hold decided flows, so repeat flows skip the queue
//	filter/conntrack  cuts established connections a new snapshot denies
//
// An Engine holds what the queue workers share (the snapshot in force, counters, the log
// writer); each worker judges through a Path of its own, which needs no lock.
package filter
