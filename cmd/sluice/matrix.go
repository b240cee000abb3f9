package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-dev/sluice/policy"
)

// defaultMaxPorts caps the ports derived from the state: a dump of a real cluster mentions
// dozens, and a grid per port stops being readable long before that.
const defaultMaxPorts = 8

type portProto struct {
	Proto policy.Protocol
	Port  uint16
}

func (p portProto) String() string { return strconv.Itoa(int(p.Port)) + "/" + p.Proto.String() }

type matrixOptions struct {
	statePath, ports, output string
	namespaces               []string
	maxPods                  int
}

func newMatrixCmd() *cobra.Command {
	o := &matrixOptions{}
	cmd := &cobra.Command{
		Use:   "matrix --state FILE [--ports 80/TCP,53/UDP]",
		Short: "Print the pod-to-pod reachability grid, one per port",
		Long: `matrix prints, for each port, which pods may open a connection to which: rows are sources,
columns destinations, "." allowed and "X" denied (as the upstream Kubernetes e2e network policy
tests print their truth tables). Each pod stands for its primary address (its address of the other pod's family when they
differ; "-" when they share none). Every pod is judged as
local, so both the source's egress and the destination's ingress count.

Without --ports, the ports are every distinct numeric port the policies and the pods' container
ports mention (at most 8, lowest first), or 80/TCP when there are none.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	f := cmd.Flags()
	f.StringVar(&o.statePath, "state", "", "state file (- for stdin): multi-document YAML or a kind: List of Namespaces, Pods and NetworkPolicies")
	f.StringVar(&o.ports, "ports", "", "comma-separated PORT/PROTO list, e.g. 80/TCP,53/UDP (default: the ports the state mentions)")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text, json or markdown")
	f.StringSliceVar(&o.namespaces, "namespace", nil, "only pods of these namespaces (repeatable or comma-separated)")
	f.IntVar(&o.maxPods, "max-pods", 100, "refuse to draw more pods than this")
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func (o *matrixOptions) run(cmd *cobra.Command) error {
	if err := checkOutput(o.output, "text", "json", "markdown"); err != nil {
		return err
	}
	var pps []portProto
	if o.ports != "" {
		for _, s := range strings.Split(o.ports, ",") {
			proto, port, err := parsePortProto(s)
			if err != nil {
				return fmt.Errorf("--ports: %w", err)
			}
			pp := portProto{proto, port}
			if !slices.Contains(pps, pp) {
				pps = append(pps, pp)
			}
		}
	}
	st, err := loadState(cmd, o.statePath)
	if err != nil {
		return err
	}
	if len(pps) == 0 {
		var more int
		pps, more = statePorts(st, defaultMaxPorts)
		if more > 0 {
			fmt.Fprintf(cmd.ErrOrStderr(), "note: showing %d of %d ports; choose with --ports\n", len(pps), len(pps)+more)
		}
	}
	pods := matrixPods(st, o.namespaces)
	switch {
	case len(pods) == 0:
		return fmt.Errorf("%s: no running pods with an IP to draw a matrix of", o.statePath)
	case len(pods) > o.maxPods:
		return fmt.Errorf("%s: %d pods would make an unreadable grid; narrow with --namespace or raise --max-pods", o.statePath, len(pods))
	}
	snap, err := policy.Compile(st, policy.Options{})
	if err != nil {
		return fmt.Errorf("%s: %w", o.statePath, err)
	}
	m := buildMatrix(snap, pods, pps)
	out := cmd.OutOrStdout()
	switch o.output {
	case "json":
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(m)
	case "markdown":
		m.markdown(out)
	default:
		return m.text(out)
	}
	return nil
}

// statePorts lists the numeric ports the policies and container ports mention, lowest first,
// at most limit of them; more says how many were left out. Named policy ports are covered by
// the container ports they name.
func statePorts(st *policy.State, limit int) (out []portProto, more int) {
	seen := make(map[portProto]bool)
	add := func(p *corev1.Protocol, port int32) {
		proto := policy.TCP
		if p != nil {
			var ok bool
			if proto, ok = policy.ProtocolFromK8s(*p); !ok {
				return
			}
		}
		if port < 1 || port > 65535 {
			return
		}
		seen[portProto{proto, uint16(port)}] = true
	}
	for i := range st.Policies {
		spec := &st.Policies[i].Spec
		var ports []networkingv1.NetworkPolicyPort
		for _, r := range spec.Ingress {
			ports = append(ports, r.Ports...)
		}
		for _, r := range spec.Egress {
			ports = append(ports, r.Ports...)
		}
		for _, p := range ports {
			if p.Port != nil && p.Port.Type == intstr.Int {
				add(p.Protocol, p.Port.IntVal)
				if p.EndPort != nil {
					add(p.Protocol, *p.EndPort)
				}
			}
		}
	}
	for i := range st.Pods {
		for _, c := range st.Pods[i].Spec.Containers {
			for _, cp := range c.Ports {
				proto := cp.Protocol
				add(&proto, cp.ContainerPort)
			}
		}
	}
	for pp := range seen {
		out = append(out, pp)
	}
	slices.SortFunc(out, func(a, b portProto) int { return cmp.Or(cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto)) })
	if len(out) == 0 {
		return []portProto{{policy.TCP, 80}}, 0
	}
	if len(out) > limit {
		return out[:limit], len(out) - limit
	}
	return out, 0
}

type matrixPod struct {
	Name  string       `json:"name"` // namespace/pod
	IP    netip.Addr   `json:"ip"`   // primary address
	addrs []netip.Addr // primary first
}

func matrixPods(st *policy.State, namespaces []string) []matrixPod {
	var out []matrixPod
	for i := range st.Pods {
		p := &st.Pods[i]
		if !policy.Participates(p) || len(namespaces) > 0 && !slices.Contains(namespaces, p.Namespace) {
			continue
		}
		addrs := policy.PodAddrs(p)
		out = append(out, matrixPod{Name: p.Namespace + "/" + p.Name, IP: addrs[0], addrs: addrs})
	}
	slices.SortFunc(out, func(a, b matrixPod) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

type reachability struct {
	Port    string   `json:"port"`
	Allowed [][]bool `json:"allowed"` // [from][to]
	// Reasons holds policy.Reason words (unisolated, rule, egress-denied, ingress-denied), or
	// no-common-family when the two pods share no IP family.
	Reasons [][]string `json:"reasons"`
	Count   int        `json:"allowedCount"`
}

const noCommonFamily = "no-common-family"

// flowAddrs picks one address per pod of the same family: the source's primary and the
// destination's address of that family, else the destination's primary and the source's
// address of that family.
func flowAddrs(from, to matrixPod) (netip.Addr, netip.Addr, bool) {
	if d, ok := sameFamily(to.addrs, from.IP); ok {
		return from.IP, d, true
	}
	if s, ok := sameFamily(from.addrs, to.IP); ok {
		return s, to.IP, true
	}
	return netip.Addr{}, netip.Addr{}, false
}

type matrix struct {
	Pods     []matrixPod    `json:"pods"`
	Ports    []string       `json:"ports"`
	Matrices []reachability `json:"matrices"`
}

func buildMatrix(snap *policy.Snapshot, pods []matrixPod, pps []portProto) *matrix {
	m := &matrix{Pods: pods}
	for _, pp := range pps {
		r := reachability{Port: pp.String(), Allowed: make([][]bool, len(pods)), Reasons: make([][]string, len(pods))}
		for i, from := range pods {
			r.Allowed[i] = make([]bool, len(pods))
			r.Reasons[i] = make([]string, len(pods))
			for j, to := range pods {
				src, dst, ok := flowAddrs(from, to)
				if !ok {
					r.Reasons[i][j] = noCommonFamily
					continue
				}
				v := snap.Decide(policy.Flow{Src: src, Dst: dst, Proto: pp.Proto, Port: pp.Port})
				r.Allowed[i][j] = v.Allowed
				r.Reasons[i][j] = v.Reason.String()
				if v.Allowed {
					r.Count++
				}
			}
		}
		m.Ports = append(m.Ports, r.Port)
		m.Matrices = append(m.Matrices, r)
	}
	return m
}

func (r *reachability) cell(i, j int) string {
	switch {
	case r.Allowed[i][j]:
		return "."
	case r.Reasons[i][j] == noCommonFamily:
		return "-"
	}
	return "X"
}

func (r *reachability) legend() string {
	for _, row := range r.Reasons {
		if slices.Contains(row, noCommonFamily) {
			return ". allowed, X denied, - no common IP family"
		}
	}
	return ". allowed, X denied"
}

func (m *matrix) text(w io.Writer) error {
	for k, r := range m.Matrices {
		if k > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "Reachability %s (rows: from, columns: to; %s): %d of %d allowed\n", r.Port, r.legend(), r.Count, len(m.Pods)*len(m.Pods))
		tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
		fmt.Fprint(tw, "-")
		for _, p := range m.Pods {
			fmt.Fprint(tw, "\t"+p.Name)
		}
		fmt.Fprintln(tw)
		for i, p := range m.Pods {
			fmt.Fprint(tw, p.Name)
			for j := range m.Pods {
				fmt.Fprint(tw, "\t"+r.cell(i, j))
			}
			fmt.Fprintln(tw)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func (m *matrix) markdown(w io.Writer) {
	for k, r := range m.Matrices {
		if k > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "### %s\n\n%d of %d allowed; rows: from, columns: to; %s.\n\n", r.Port, r.Count, len(m.Pods)*len(m.Pods), r.legend())
		fmt.Fprint(w, "| from \\ to |")
		for _, p := range m.Pods {
			fmt.Fprintf(w, " %s |", p.Name)
		}
		fmt.Fprint(w, "\n|---|")
		for range m.Pods {
			fmt.Fprint(w, ":-:|")
		}
		fmt.Fprintln(w)
		for i, p := range m.Pods {
			fmt.Fprintf(w, "| %s |", p.Name)
			for j := range m.Pods {
				fmt.Fprintf(w, " %s |", r.cell(i, j))
			}
			fmt.Fprintln(w)
		}
	}
}
