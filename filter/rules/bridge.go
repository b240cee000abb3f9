package rules

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// With a bridge CNI (bridge, flannel, kubenet) traffic between two pods of one node is
// switched by the bridge and reaches iptables only when br_netfilter hands bridged frames to
// it, which the sysctls net.bridge.bridge-nf-call-iptables and -ip6tables decide (per network
// namespace). With them off, same-node pod traffic skips every sluice rule.
var bridgeSysctls = []string{
	"/proc/sys/net/bridge/bridge-nf-call-iptables",
	"/proc/sys/net/bridge/bridge-nf-call-ip6tables",
}

// CheckBridges finds the interfaces of this network namespace that match patterns (iptables
// interface patterns) and are bridges or bridge ports. When there are any, the br_netfilter
// sysctls must be on: with set it turns them on, else it returns an error that says what to do.
// It returns the bridged interfaces it found.
func CheckBridges(patterns []string, set bool) ([]string, error) {
	links, err := os.ReadDir("/sys/class/net")
	if err != nil {
		return nil, fmt.Errorf("rules: list interfaces: %w", err)
	}
	var bridged []string
	for _, l := range links {
		name := l.Name()
		if !matchesAny(name, patterns) {
			continue
		}
		for _, f := range []string{"bridge", "brport"} { // is a bridge, is enslaved to one
			if _, err := os.Stat(filepath.Join("/sys/class/net", name, f)); err == nil {
				bridged = append(bridged, name)
				break
			}
		}
	}
	if len(bridged) == 0 {
		return nil, nil
	}
	slices.Sort(bridged)
	for _, p := range bridgeSysctls {
		b, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(b)) == "1" {
			continue
		}
		name := strings.ReplaceAll(strings.TrimPrefix(p, "/proc/sys/"), "/", ".")
		if err != nil {
			return bridged, fmt.Errorf("pod interfaces %s are bridged but %s is missing (%v): load br_netfilter (modprobe br_netfilter), or bridged pod traffic skips sluice", strings.Join(bridged, ","), name, err)
		}
		if !set {
			return bridged, fmt.Errorf("pod interfaces %s are bridged and %s is 0, so traffic between pods of this node skips sluice: set it to 1 (sysctl -w %s=1) or run the agent with --set-bridge-nf-call", strings.Join(bridged, ","), name, name)
		}
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			return bridged, fmt.Errorf("setting %s=1: %w", name, err)
		}
	}
	return bridged, nil
}

// matchesAny applies iptables interface patterns: a trailing + matches any suffix.
func matchesAny(name string, patterns []string) bool {
	for _, p := range patterns {
		if prefix, ok := strings.CutSuffix(p, "+"); ok {
			if strings.HasPrefix(name, prefix) {
				return true
			}
		} else if name == p {
			return true
		}
	}
	return false
}
