package netlab

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// Host is one namespace of the lab: a pod, an outside host, or the node itself.
type Host struct {
	lab   *Lab
	Name  string       // the name given to AddHost ("node" for the node)
	Netns string       // the network namespace's name, for `ip netns exec`
	Veth  string       // the node-side interface towards this host ("" for the node)
	Addrs []netip.Addr // its addresses
}

// Addr returns the host's first address of the family of want (IPv4 when want is false, IPv6
// when true); ok is false when it has none.
func (h *Host) Addr(v6 bool) (netip.Addr, bool) {
	for _, a := range h.Addrs {
		if a.Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// Command prepares name args... to run inside the host's namespace (through `ip netns exec`).
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.Netns, name}, args...)...)
}

// Exec runs name args... inside the host's namespace and returns its combined output; the error
// carries the output, so a failing command explains itself.
func (h *Host) Exec(name string, args ...string) (string, error) {
	out, err := h.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %v: %s", name, strings.Join(args, " "), h.Netns, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (h *Host) ipBatch(script string) error {
	if script == "" {
		return nil
	}
	cmd := exec.Command("ip", "-n", h.Netns, "-batch", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s -batch: %v: %s (script:\n%s)", h.Netns, err, bytes.TrimSpace(out), script)
	}
	return nil
}

// Do runs f on an OS thread that has entered the host's namespace. Sockets f creates stay in the
// namespace for their whole life, whichever goroutine uses them later, and commands f starts
// (os/exec) run in it too. Goroutines f starts do NOT run in the namespace.
func (h *Host) Do(f func() error) error {
	target, err := netns.GetFromName(h.Netns)
	if err != nil {
		return fmt.Errorf("netlab: open namespace %s: %w", h.Netns, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: enter namespace %s: %w", h.Netns, err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked, so the runtime ends it with this goroutine and no other
			// goroutine ever runs in the lab namespace by accident.
			errc <- errors.Join(ferr, fmt.Errorf("netlab: leave namespace %s: %w", h.Netns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// writeSysctls sets /proc/sys entries (keys like "net/ipv4/ip_forward") in the host's namespace;
// /proc/sys/net follows the namespace of the thread that opens it.
func (h *Host) writeSysctls(kv map[string]string) error {
	return h.Do(func() error {
		var errs []error
		for k, v := range kv {
			if err := writeFile(filepath.Join("/proc/sys", k), v); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
}

// Sysctl sets one network sysctl (e.g. "net.netfilter.nf_conntrack_tcp_loose") in the host's
// namespace.
func (h *Host) Sysctl(key, value string) error {
	return h.writeSysctls(map[string]string{strings.ReplaceAll(key, ".", "/"): value})
}
