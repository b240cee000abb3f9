// Package kubenode starts the processes of a Kubernetes node (kube-proxy here; hack/k8s-node.sh
// runs a whole node) inside a network namespace of the lab (internal/netlab), and carries
// connections from a namespace to a server that listens in the machine's own namespace (a test
// API server on loopback).
//
// Processes enter the namespace with `nsenter --net=`, never `ip netns exec`: the latter also
// gives each process a private mount namespace, so mounts one component makes (the kubelet's
// volumes) would be invisible to another (containerd).
package kubenode

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
)

// NetnsPath is where `ip netns add` (and so netlab) binds a named network namespace.
func NetnsPath(h *netlab.Host) string { return filepath.Join("/run/netns", h.Netns) }

// Command prepares argv to run in the network namespace of h (nsenter execs it, so the process
// is the component itself, and signals reach it directly).
func Command(h *netlab.Host, argv ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + NetnsPath(h), "--"}, argv...)...)
}

// Start runs argv in the network namespace of h with its output captured (agentproc serves any
// child process, not only the agent). The lab also kills it when it removes the namespace, but
// callers should Stop it themselves to see how it ended.
func Start(h *netlab.Host, argv ...string) (*agentproc.Proc, error) {
	if len(argv) == 0 {
		return nil, errors.New("kubenode: Start needs a command")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return nil, errors.New("kubenode: nsenter (util-linux) is missing; run hack/node-deps.sh")
	}
	p, err := agentproc.Start(Command(h, argv...))
	if err != nil {
		return nil, fmt.Errorf("kubenode: %w", err)
	}
	return p, nil
}
