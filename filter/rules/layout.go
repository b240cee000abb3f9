package rules

import (
	"fmt"
	"strings"
)

// The rules sluice writes, per address family. In the filter table:
//
//	FORWARD -> SLUICE-FORWARD   pod<->pod through the node, pod<->outside
//	INPUT   -> SLUICE-INPUT     local pod -> the node's own addresses
//	OUTPUT  -> SLUICE-OUTPUT    node -> local pod (only judged with JudgeNode)
//	each    -> SLUICE-QUEUE     what may skip the queue, the admission limit, NFQUEUE
//	           SLUICE-PASS      clears the pass mark and returns to FORWARD/INPUT/OUTPUT
//
// and in the raw table, before conntrack sees anything:
//
//	PREROUTING -i <pod interface> -> SLUICE-ANTISPOOF   sources the pod does not own: DROP
//
// Each jump is the first rule of its chain, so kube-proxy's KUBE-FORWARD (which accepts
// masquerade-marked packets) and a CNI's accepts cannot skip sluice.
//
// sluice's verdict means "policy allows", not "accept the packet": an accepted packet gets
// NF_REPEAT with the pass mark, which runs the hook again from its first rule; the first rule
// of sluice's chain sees the mark, SLUICE-PASS clears it, and the packet goes on with the rest
// of FORWARD, INPUT or OUTPUT (kube-proxy's REJECT for services without endpoints, its
// localnet drop, an operator's DROP). Marks cannot come from a pod: the kernel clears them
// when a packet crosses network namespaces.
//
// What never reaches the queue: packets of connections conntrack already holds (ESTABLISHED,
// RELATED: which includes ICMP errors about them) in the default mode; in queue-all mode only
// RELATED ICMP errors. Neighbour discovery only where it cannot leave the link (hop limit 255,
// link-scope destination). Everything else from or to a local pod is queued: NEW, INVALID and
// UNTRACKED (traffic another component marked NOTRACK) alike.

const (
	ChainForward   = "SLUICE-FORWARD"
	ChainInput     = "SLUICE-INPUT"
	ChainOutput    = "SLUICE-OUTPUT"
	ChainQueue     = "SLUICE-QUEUE"
	ChainPass      = "SLUICE-PASS"
	ChainAntispoof = "SLUICE-ANTISPOOF"
)

// Rule comments that name what a rule counts; Counters reads them back.
const (
	commentSpoofed    = "sluice:spoofed"
	commentUnknownPod = "sluice:unknown-pod"
	commentAdmission  = "sluice:admission"
	commentQueue      = "sluice:queue"
)

// DefaultMark is the pass mark bit. kube-proxy uses 0x4000 (masquerade) and 0x8000 (drop);
// Calico uses 0xffff0000; Cilium's magic marks sit in 0x0f00.
const DefaultMark = 0x1000

// DefaultPodInterfaces match the node side of pod interfaces of common CNIs: Calico (cali),
// bridge, ptp, flannel, kindnet, kube-router (veth), Cilium (lxc), AWS VPC CNI (eni),
// Azure (azv), GKE (gke).
var DefaultPodInterfaces = []string{"cali+", "veth+", "lxc+", "eni+", "azv+", "gke+"}

type jump struct{ table, from, to, match string }

// jumps are the rules sluice puts in the built-in chains, in the order they must come first.
func (r *Rules) jumps() []jump {
	j := []jump{
		{"filter", "FORWARD", ChainForward, ""},
		{"filter", "INPUT", ChainInput, ""},
		{"filter", "OUTPUT", ChainOutput, ""},
	}
	for _, p := range r.cfg.PodInterfaces {
		j = append(j, jump{"raw", "PREROUTING", ChainAntispoof, "-i " + p})
	}
	return j
}

// script writes one table of one family: our chains declared (which empties them under
// --noflush), their rules, every old jump to them deleted and the jumps inserted first.
func (r *Rules) script(fam family, table string, st tableState) string {
	var b strings.Builder
	fmt.Fprintf(&b, "*%s\n", table)
	var chains []string
	switch table {
	case "filter":
		chains = []string{ChainForward, ChainInput, ChainOutput, ChainQueue, ChainPass}
	case "raw":
		if len(r.cfg.PodInterfaces) > 0 {
			chains = []string{ChainAntispoof}
		}
	}
	for _, c := range chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, l := range r.chainRules(fam, table) {
		b.WriteString(l + "\n")
	}
	for _, l := range st.jumpLines {
		b.WriteString("-D" + strings.TrimPrefix(l, "-A") + "\n")
	}
	// Inserted in reverse so that they end up first, in order.
	var mine []jump
	for _, j := range r.jumps() {
		if j.table == table {
			mine = append(mine, j)
		}
	}
	for i := len(mine) - 1; i >= 0; i-- {
		j := mine[i]
		if j.match != "" {
			fmt.Fprintf(&b, "-I %s 1 %s -j %s\n", j.from, j.match, j.to)
		} else {
			fmt.Fprintf(&b, "-I %s 1 -j %s\n", j.from, j.to)
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// chainRules are the rules of our chains in one table of one family, as -A lines.
func (r *Rules) chainRules(fam family, table string) []string {
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	cfg := r.cfg
	set := fam.localSet
	mark := fmt.Sprintf("0x%x/0x%x", cfg.Mark, cfg.Mark)
	// ndLocal: neighbour discovery that cannot leave the link.
	ndLocal := func(chain, target string) {
		for _, dst := range []string{"fe80::/10", "ff02::/16"} {
			// router solicitation and advertisement, neighbour solicitation and
			// advertisement, redirect
			for _, t := range []string{"133", "134", "135", "136", "137"} {
				add("-A %s -d %s -p ipv6-icmp -m icmp6 --icmpv6-type %s -m hl --hl-eq 255 -j %s", chain, dst, t, target)
			}
		}
	}
	// unknown: traffic of a pod interface whose address is in no snapshot yet follows the fail
	// mode: with fail-open it goes on unjudged (for its own side), fail-closed it is dropped.
	unknown := func(chain, dir, iface string) {
		if cfg.Queues.FailOpen {
			return
		}
		for _, p := range cfg.PodInterfaces {
			add("-A %s %s %s -m set ! --match-set %s %s -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment %s -j DROP",
				chain, iface, p, set, dir, commentUnknownPod)
		}
	}
	switch table {
	case "raw":
		if len(cfg.PodInterfaces) == 0 {
			return nil
		}
		if fam.v6 {
			// A pod's link-local address is its own but in no snapshot: it may only do
			// neighbour discovery with it (and duplicate address detection from ::).
			for _, src := range []string{"fe80::/10", "::/128"} {
				for _, t := range []string{"133", "135", "136"} {
					add("-A %s -s %s -p ipv6-icmp -m icmp6 --icmpv6-type %s -m hl --hl-eq 255 -j RETURN", ChainAntispoof, src, t)
				}
			}
			add("-A %s -s fe80::/10 -m comment --comment %s -j DROP", ChainAntispoof, commentSpoofed)
		}
		// Strict reverse-path check: the node's route back to the source must leave through the
		// interface the packet came in on. A routed CNI gives every pod address a host route to
		// the pod's interface, so any other source, a second address the pod added included,
		// fails it.
		add("-A %s -m rpfilter --invert -m comment --comment %s -j DROP", ChainAntispoof, commentSpoofed)
	case "filter":
		for _, c := range []string{ChainForward, ChainInput, ChainOutput} {
			add("-A %s -m mark --mark %s -g %s", c, mark, ChainPass)
		}
		add("-A %s -j MARK --set-xmark 0x0/0x%x", ChainPass, cfg.Mark)

		unknown(ChainForward, "src", "-i")
		unknown(ChainForward, "dst", "-o")
		add("-A %s -m set --match-set %s src -g %s", ChainForward, set, ChainQueue)
		add("-A %s -m set --match-set %s dst -g %s", ChainForward, set, ChainQueue)

		if fam.v6 {
			ndLocal(ChainInput, "RETURN")
		}
		if cfg.QueueAll && !cfg.JudgeNode {
			// Replies to the node's own connections: OUTPUT does not show those connections to
			// the agent, so it could not recognise their replies as such.
			add("-A %s -m conntrack --ctdir REPLY -j RETURN", ChainInput)
		}
		unknown(ChainInput, "src", "-i")
		add("-A %s -m set --match-set %s src -g %s", ChainInput, set, ChainQueue)
		if cfg.JudgeNode {
			if fam.v6 {
				ndLocal(ChainOutput, "RETURN")
			}
			add("-A %s -m set --match-set %s dst -g %s", ChainOutput, set, ChainQueue)
		}

		icmp := "icmp"
		if fam.v6 {
			icmp = "ipv6-icmp"
		}
		if cfg.QueueAll {
			add("-A %s -p %s -m conntrack --ctstate RELATED -j RETURN", ChainQueue, icmp)
		} else {
			add("-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", ChainQueue)
		}
		if o := cfg.Offload; o != nil {
			allow, deny := o.Allow4, o.Deny4
			if fam.v6 {
				allow, deny = o.Allow6, o.Deny6
			}
			// An offloaded allow is policy's allow too: the rest of the chain still applies.
			if allow != "" {
				add("-A %s -m set --match-set %s src,dst,dst -j RETURN", ChainQueue, allow)
			}
			if deny != "" {
				add("-A %s -m set --match-set %s src,dst,dst -j DROP", ChainQueue, deny)
			}
		}
		if a := cfg.Admission; a.Rate > 0 {
			name := "sluice4"
			if fam.v6 {
				name = "sluice6"
			}
			add("-A %s -m hashlimit --hashlimit-above %d/sec --hashlimit-burst %d --hashlimit-mode srcip --hashlimit-name %s -m comment --comment %s -j DROP",
				ChainQueue, a.Rate, max(a.Burst, 1), name, commentAdmission)
		}
		q := cfg.Queues
		target := fmt.Sprintf("--queue-num %d", q.First)
		if q.Count > 1 {
			target = fmt.Sprintf("--queue-balance %d:%d", q.First, q.Last())
		}
		if q.FailOpen {
			target += " --queue-bypass"
		}
		add("-A %s -m comment --comment %s -j NFQUEUE %s", ChainQueue, commentQueue, target)
	}
	return out
}
