package rules

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Counters are what sluice's own rules counted since Install, summed over both families and
// over every repair (a repair rewrites the chains, which resets the kernel's counters).
type Counters struct {
	Spoofed    uint64 // dropped by the anti-spoofing check
	UnknownPod uint64 // dropped: a pod interface whose address is in no snapshot (fail-closed)
	Admission  uint64 // dropped by the per-source admission limit in front of the queue
	Queued     uint64 // reached the NFQUEUE rule
}

// Resync compares the kernel with what Install wrote — each jump first in its chain, our
// chains' rules, the local pod sets and their sizes — and, when anything differs (a firewalld
// reload, an iptables-restore without --noflush, a component inserting its jumps above ours),
// writes everything again. It returns what it found wrong (nil when nothing was) and an error
// when it could not repair. It also brings Counters up to date.
func (r *Rules) Resync() (repaired []string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()

	var wrong []string
	seen := map[string]uint64{}
	for _, fam := range families(r.backend) {
		for _, table := range tables {
			st, err := readTable(fam, table)
			if err != nil {
				return nil, err
			}
			key := fam.name + " " + table
			if !slices.Equal(st.ours, r.want[key]) {
				wrong = append(wrong, key+" chains")
			}
			if !r.jumpsFirst(table, st) {
				wrong = append(wrong, key+" jumps")
			}
			for c, n := range st.counters {
				seen[c] += n
			}
		}
	}
	for set, want := range r.localCount {
		n, err := setSize(set)
		if err != nil || n != want {
			wrong = append(wrong, "set "+set)
		}
	}
	r.account(seen)
	if len(wrong) == 0 {
		return nil, nil
	}
	if err := r.installLocked(r.local); err != nil {
		return wrong, fmt.Errorf("rules: repairing %s: %w", strings.Join(wrong, ", "), err)
	}
	// The chains were rewritten, their counters start again from zero.
	r.counters.prev = nil
	return wrong, nil
}

// jumpsFirst reports whether our jumps are the first rules of their built-in chains, in order,
// and appear nowhere else.
func (r *Rules) jumpsFirst(table string, st tableState) bool {
	want := map[string][]string{}
	n := 0
	for _, j := range r.jumps() {
		if j.table != table {
			continue
		}
		line := "-A " + j.from
		if j.match != "" {
			line += " " + j.match
		}
		want[j.from] = append(want[j.from], line+" -j "+j.to)
		n++
	}
	if len(st.jumpLines) != n {
		return false
	}
	for chain, lines := range want {
		head := st.heads[chain]
		if len(head) < len(lines) || !slices.Equal(head[:len(lines)], lines) {
			return false
		}
	}
	return true
}

// account adds the kernel counters read now to the running totals.
func (r *Rules) account(now map[string]uint64) {
	c := &r.counters
	add := func(total *uint64, name string) {
		cur, prev := now[name], c.prev[name]
		if cur >= prev {
			*total += cur - prev
		} else { // the rule was rewritten meanwhile
			*total += cur
		}
	}
	add(&c.Spoofed, commentSpoofed)
	add(&c.UnknownPod, commentUnknownPod)
	add(&c.Admission, commentAdmission)
	add(&c.Queued, commentQueue)
	c.prev = now
}

// Counters returns the totals as of the last Resync.
func (r *Rules) Counters() Counters {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counters.Counters
}

// setSize is the number of entries of an ipset.
func setSize(name string) (int, error) {
	out, err := runCmd(nil, "ipset", "list", "-t", name)
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "Number of entries:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, fmt.Errorf("ipset list -t %s: no entry count", name)
}
