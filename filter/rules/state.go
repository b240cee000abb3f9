package rules

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
)

// tableState is what iptables-save shows of one table of one family.
type tableState struct {
	chains    []string            // SLUICE-* chains present
	jumpLines []string            // rules in other chains that jump to ours, as "-A FROM ..." lines
	ours      []string            // the rules of our chains, in order, without counters
	heads     map[string][]string // built-in chain -> its rules in order (for the jumps' position)
	counters  map[string]uint64   // rule comment -> packets, summed over our rules carrying it
}

func readTable(fam family, table string) (tableState, error) {
	st := tableState{heads: map[string][]string{}, counters: map[string]uint64{}}
	out, err := runCmd(nil, fam.save, "-c", "-t", table)
	if err != nil {
		return st, fmt.Errorf("rules: read %s %s rules with %s: %w", fam.name, table, fam.save, err)
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var packets uint64
		if strings.HasPrefix(line, "[") {
			// "[packets:bytes] -A CHAIN ..."
			end := strings.IndexByte(line, ']')
			if end < 0 {
				continue
			}
			if p, _, ok := strings.Cut(line[1:end], ":"); ok {
				packets, _ = strconv.ParseUint(p, 10, 64)
			}
			line = strings.TrimSpace(line[end+1:])
		}
		switch {
		case strings.HasPrefix(line, ":"+chainPrefix):
			st.chains = append(st.chains, strings.Fields(line[1:])[0])
		case strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			if strings.HasPrefix(f[1], chainPrefix) {
				st.ours = append(st.ours, line)
				if c := comment(line); c != "" {
					st.counters[c] += packets
				}
				continue
			}
			st.heads[f[1]] = append(st.heads[f[1]], line)
			for i := 2; i+1 < len(f); i++ {
				if (f[i] == "-j" || f[i] == "-g") && strings.HasPrefix(f[i+1], chainPrefix) {
					st.jumpLines = append(st.jumpLines, line)
				}
			}
		}
	}
	return st, sc.Err()
}

// comment is the --comment of a rule line as iptables-save prints it, or "".
func comment(line string) string {
	_, rest, ok := strings.Cut(line, "--comment ")
	if !ok {
		return ""
	}
	rest = strings.TrimPrefix(rest, `"`)
	if i := strings.IndexAny(rest, `" `); i >= 0 {
		rest = rest[:i]
	}
	return rest
}
