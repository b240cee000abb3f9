// Package policy turns the cluster's Pods, Namespaces and NetworkPolicies into an immutable,
// compiled decision structure (a Snapshot) that answers "is this flow allowed, and why?".
//
// Decide is the hot path: no allocation, no lock. Explain is the cold path that says which
// policies isolated each end and which rule, peer and port allowed the flow, or why none did.
package policy

import (
	"cmp"
	"net/netip"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Protocol is an IP protocol number as it appears in the packet header.
type Protocol uint8

const (
	TCP  Protocol = 6
	UDP  Protocol = 17
	SCTP Protocol = 132
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case SCTP:
		return "SCTP"
	case 1:
		return "ICMP"
	case 58:
		return "ICMPv6"
	}
	return "proto-" + strconv.Itoa(int(p))
}

// ProtocolFromK8s maps a Kubernetes protocol name to its number; ok is false for unknown names.
func ProtocolFromK8s(p corev1.Protocol) (Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return TCP, true
	case corev1.ProtocolUDP:
		return UDP, true
	case corev1.ProtocolSCTP:
		return SCTP, true
	}
	return 0, false
}

// Flow is everything a NetworkPolicy verdict depends on. The source port never matters.
type Flow struct {
	Src, Dst netip.Addr
	Proto    Protocol
	Port     uint16 // destination port; 0 for protocols without ports
}

// Reason is the one-word cause of a verdict.
type Reason uint8

const (
	// ReasonUnisolated: allowed because no policy isolates either end in the relevant direction.
	ReasonUnisolated Reason = iota
	// ReasonRule: allowed because a rule of a policy isolating an end matched (both ends, if both
	// are isolated).
	ReasonRule
	// ReasonEgress: denied because the source is isolated for egress and no egress rule matched.
	ReasonEgress
	// ReasonIngress: denied because the destination is isolated for ingress and no ingress rule
	// matched.
	ReasonIngress
)

func (r Reason) String() string {
	switch r {
	case ReasonUnisolated:
		return "unisolated"
	case ReasonRule:
		return "rule"
	case ReasonEgress:
		return "egress-denied"
	case ReasonIngress:
		return "ingress-denied"
	}
	return "unknown"
}

// Verdict is the hot-path answer: small, comparable, no pointers.
type Verdict struct {
	Allowed bool
	Reason  Reason
}

// State is the cluster as the API server stores it (after defaulting): the input of Compile.
// Objects are used read-only.
type State struct {
	Namespaces []corev1.Namespace
	Pods       []corev1.Pod
	Policies   []networkingv1.NetworkPolicy
}

// Options tune compilation.
type Options struct {
	// Node names this host. Pods whose spec.nodeName equals Node are local; when Node is empty,
	// every pod is local. Egress is enforced for local sources and ingress for local
	// destinations only; the other end's node enforces the other side.
	Node string
	// Generation is stamped on the snapshot so flow caches can tell stale entries.
	Generation uint64
	// IsolateInvalid makes Compile isolate, instead of fail on, policies that do not compile:
	// the snapshot comes back with the *CompileError that lists them. Sources of live cluster
	// state want this (one tenant's broken policy must not freeze everyone's updates); tools
	// that report on a file do not.
	IsolateInvalid bool
}

// PodRef names a pod.
type PodRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

func (p PodRef) String() string { return p.Namespace + "/" + p.Name }

// Compare orders pods by (namespace, name), the order listings and address ties follow.
func (p PodRef) Compare(q PodRef) int {
	return cmp.Or(cmp.Compare(p.Namespace, q.Namespace), cmp.Compare(p.Name, q.Name))
}
