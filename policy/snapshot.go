package policy

import "net/netip"

// Snapshot is an immutable compiled form of a State. Safe for concurrent use.
type Snapshot struct {
	gen uint64
}

// Stats counts what a snapshot holds.
type Stats struct {
	Namespaces, Pods, LocalPods, Policies, Rules int
}

// Compile builds a Snapshot from st. st is read, never modified.
func Compile(st *State, opt Options) (*Snapshot, error) { panic("policy.Compile: being written") }

// Generation is Options.Generation at compile time.
func (s *Snapshot) Generation() uint64 { return s.gen }

// Decide is the hot path: zero allocations.
func (s *Snapshot) Decide(f Flow) Verdict { panic("being written") }

// Explain says why Decide answers what it does.
func (s *Snapshot) Explain(f Flow) Explanation { panic("being written") }

// Pod returns the pod that owns ip (local or not).
func (s *Snapshot) Pod(ip netip.Addr) (PodRef, bool) { panic("being written") }

// IsLocal reports whether ip belongs to a pod on this node.
func (s *Snapshot) IsLocal(ip netip.Addr) bool { panic("being written") }

// LocalPodIPs lists every IP of every local pod.
func (s *Snapshot) LocalPodIPs() []netip.Addr { panic("being written") }

// Stats describes the snapshot's size.
func (s *Snapshot) Stats() Stats { panic("being written") }
