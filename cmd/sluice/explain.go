package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"

	"github.com/sluice-dev/sluice/policy"
)

type explainOptions struct {
	statePath, from, to, port, output, node string
}

func newExplainCmd() *cobra.Command {
	o := &explainOptions{}
	cmd := &cobra.Command{
		Use:   "explain --state FILE --from SRC --to DST --port PORT/PROTO",
		Short: "Say whether a flow is allowed, and which policies and rules decide it",
		Long: `explain answers "would a new connection from SRC to DST on PORT/PROTO be allowed, and why?".

SRC and DST are namespace/pod or an IP address. A pod named by name stands for its primary
address (the first of status.podIPs); when the other end is an address, the pod's address of that
family is used, and naming one of a pod's IPs asks about that family. PORT/PROTO is e.g. 8080/TCP,
53/UDP or 2905/SCTP (a bare port means TCP).

Without --node every pod is judged as if local, so both the source's egress and the
destination's ingress are checked; with --node only the sides that node enforces are.
The exit status is 0 whether the flow is allowed or not; -o json prints one object with
"allowed", "reason" and the details of each side.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	f := cmd.Flags()
	f.StringVar(&o.statePath, "state", "", "state file (- for stdin): multi-document YAML or a kind: List of Namespaces, Pods and NetworkPolicies")
	f.StringVar(&o.from, "from", "", "source: namespace/pod or an IP address")
	f.StringVar(&o.to, "to", "", "destination: namespace/pod or an IP address")
	f.StringVar(&o.port, "port", "", "destination port and protocol, e.g. 8080/TCP, 53/UDP")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	f.StringVar(&o.node, "node", "", "judge as the agent on this node would (only its pods' sides are enforced); default: every pod is local")
	for _, name := range []string{"state", "from", "to", "port"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func (o *explainOptions) run(cmd *cobra.Command) error {
	if err := checkOutput(o.output, "text", "json"); err != nil {
		return err
	}
	proto, dport, err := parsePortProto(o.port)
	if err != nil {
		return fmt.Errorf("--port: %w", err)
	}
	st, err := loadState(cmd, o.statePath)
	if err != nil {
		return err
	}
	src, err := resolveFlowEnd(st, o.from)
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	dst, err := resolveFlowEnd(st, o.to)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	srcIP, dstIP, err := pickAddrs(src, dst)
	if err != nil {
		return err
	}
	snap, err := policy.Compile(st, policy.Options{Node: o.node})
	if err != nil {
		return fmt.Errorf("%s: %w", o.statePath, err)
	}
	exp := snap.Explain(policy.Flow{Src: srcIP, Dst: dstIP, Proto: proto, Port: dport})
	if o.output == "json" {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(exp)
	}
	printExplanation(cmd.OutOrStdout(), &exp)
	return nil
}

// parsePortProto reads PORT/PROTO; the protocol is case-insensitive and defaults to TCP.
func parsePortProto(s string) (policy.Protocol, uint16, error) {
	num, proto, hasProto := strings.Cut(strings.TrimSpace(s), "/")
	p := policy.TCP
	if hasProto {
		var ok bool
		p, ok = policy.ProtocolFromK8s(corev1.Protocol(strings.ToUpper(proto)))
		if !ok || proto == "" {
			return 0, 0, fmt.Errorf("protocol %q is not one of TCP, UDP, SCTP", proto)
		}
	}
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil || n == 0 {
		return 0, 0, fmt.Errorf("%q is not PORT/PROTO with a port from 1 to 65535, e.g. 8080/TCP", s)
	}
	return p, uint16(n), nil
}

// flowEnd is a resolved --from or --to: a pod (with its addresses, primary first) or an IP.
type flowEnd struct {
	pod   *corev1.Pod
	addrs []netip.Addr
}

func resolveFlowEnd(st *policy.State, s string) (flowEnd, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return flowEnd{}, fmt.Errorf("%q: an address with a zone cannot be a pod or cluster peer; drop %%%s", s, a.Zone())
		}
		return flowEnd{addrs: []netip.Addr{a.Unmap()}}, nil
	}
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return flowEnd{}, fmt.Errorf("%q is neither namespace/pod nor an IP address", s)
	}
	var inNS []string
	for i := range st.Pods {
		p := &st.Pods[i]
		if p.Namespace != ns {
			continue
		}
		if p.Name != name {
			inNS = append(inNS, p.Name)
			continue
		}
		switch {
		case p.Spec.HostNetwork:
			return flowEnd{}, fmt.Errorf("pod %s uses the host network: its traffic is the node's, which NetworkPolicy does not govern; ask about the node's IP instead", s)
		case p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed:
			return flowEnd{}, fmt.Errorf("pod %s has finished (phase %s) and takes no part in traffic", s, p.Status.Phase)
		case !policy.Participates(p):
			return flowEnd{}, fmt.Errorf("pod %s has no IP in status.podIPs or status.podIP; give it one in the state file or name an IP", s)
		}
		return flowEnd{pod: p, addrs: policy.PodAddrs(p)}, nil
	}
	if len(inNS) == 0 {
		return flowEnd{}, fmt.Errorf("no pod %s in the state: namespace %s has no pods there", s, ns)
	}
	slices.Sort(inNS)
	const show = 5
	more := ""
	if len(inNS) > show {
		more = fmt.Sprintf(" and %d more", len(inNS)-show)
		inNS = inNS[:show]
	}
	return flowEnd{}, fmt.Errorf("no pod %s in the state; namespace %s has %s%s", s, ns, strings.Join(inNS, ", "), more)
}

// pickAddrs chooses one address per end of the same family: an end given as an address fixes
// the family; two pods use the source's primary address.
func pickAddrs(src, dst flowEnd) (netip.Addr, netip.Addr, error) {
	family := func(a netip.Addr) string {
		if a.Is4() {
			return "IPv4"
		}
		return "IPv6"
	}
	if src.pod != nil && dst.pod == nil {
		s, ok := sameFamily(src.addrs, dst.addrs[0])
		if !ok {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("--from pod %s/%s has no %s address to reach %s", src.pod.Namespace, src.pod.Name, family(dst.addrs[0]), dst.addrs[0])
		}
		return s, dst.addrs[0], nil
	}
	d, ok := sameFamily(dst.addrs, src.addrs[0])
	if !ok {
		if dst.pod != nil {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("--to pod %s/%s has no %s address, which %s needs", dst.pod.Namespace, dst.pod.Name, family(src.addrs[0]), src.addrs[0])
		}
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("--from %s and --to %s are of different IP families", src.addrs[0], dst.addrs[0])
	}
	return src.addrs[0], d, nil
}

// sameFamily is the first of addrs of like's family. explain and matrix both pick a pod's
// address this way.
func sameFamily(addrs []netip.Addr, like netip.Addr) (netip.Addr, bool) {
	for _, a := range addrs {
		if a.Is4() == like.Is4() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func describeEndpoint(e policy.Endpoint) string {
	if e.Pod == nil {
		return e.IP.String() + " (not a pod)"
	}
	s := e.Pod.String() + " (" + e.IP.String()
	if e.Node != "" {
		s += ", node " + e.Node
	}
	return s + ")"
}

func describeRule(r policy.RuleRef) string {
	dir, peers := "ingress", "from"
	if r.Direction == policy.Egress {
		dir, peers = "egress", "to"
	}
	peer := "any peer"
	if r.Peer >= 0 {
		peer = fmt.Sprintf("%s[%d]", peers, r.Peer)
	}
	port := "any port"
	if r.Port >= 0 {
		port = fmt.Sprintf("ports[%d]", r.Port)
	}
	return fmt.Sprintf("%s spec.%s[%d] (%s, %s)", r.Policy, dir, r.Rule, peer, port)
}

func printExplanation(w io.Writer, e *policy.Explanation) {
	verdict := "DENIED"
	if e.Allowed {
		verdict = "ALLOWED"
	}
	fmt.Fprintf(w, "%s (%s): %s -> %s, %s port %d\n", verdict, e.Reason,
		describeEndpoint(e.Source), describeEndpoint(e.Destination), e.Protocol, e.Port)
	side := func(title string, s policy.Side) {
		state := "denied"
		switch {
		case !s.Enforced:
			state = "not judged here"
		case s.Allowed:
			state = "allowed"
		}
		fmt.Fprintf(w, "%s: %s\n", title, state)
		if s.Why != "" {
			fmt.Fprintf(w, "  why: %s\n", s.Why)
		}
		if len(s.IsolatingPolicies) > 0 {
			fmt.Fprintf(w, "  isolated by: %s\n", strings.Join(s.IsolatingPolicies, ", "))
		}
		for _, r := range s.MatchedBy {
			fmt.Fprintf(w, "  allowed by: %s\n", describeRule(r))
		}
	}
	side("egress at the source", e.Egress)
	side("ingress at the destination", e.Ingress)
}
