// Package kubenode starts and stops the processes of a Kubernetes node (kube-proxy, and the
// control plane and kubelet of a whole node) inside a network namespace of the lab
// (internal/netlab), with their logs captured, and carries connections from a namespace to a
// server that listens in the machine's own namespace (a test API server on loopback).
//
// Processes enter the namespace with `nsenter --net=`, never `ip netns exec`: the latter also
// gives each process a private mount namespace, so mounts one component makes (the kubelet's
// volumes) would be invisible to another (containerd).
package kubenode

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/sluice-dev/sluice/internal/netlab"
)

// NetnsPath is where `ip netns add` (and so netlab) binds a named network namespace.
func NetnsPath(h *netlab.Host) string { return filepath.Join("/run/netns", h.Netns) }

// Proc is one component process running in a network namespace.
type Proc struct {
	Name    string
	LogPath string // stdout and stderr of the process

	cmd    *exec.Cmd
	logf   *os.File
	exited chan struct{}
	err    error // Wait's result, set before exited is closed

	stopOnce sync.Once
}

// Start runs argv in the network namespace of h with nsenter, its output appended to
// logPath. The process is also stopped by the lab when it removes the namespace, but callers
// should Stop it themselves to see how it ended.
func Start(h *netlab.Host, name, logPath string, argv ...string) (*Proc, error) {
	if len(argv) == 0 {
		return nil, errors.New("kubenode: Start needs a command")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return nil, errors.New("kubenode: nsenter (util-linux) is missing")
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kubenode: %s log: %w", name, err)
	}
	args := append([]string{"--net=" + NetnsPath(h), "--"}, argv...)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Ctrl-C meant for the test reaches the test first and the
	// cleanup decides the order in which components stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("kubenode: start %s (%s): %w", name, argv[0], err)
	}
	p := &Proc{Name: name, LogPath: logPath, cmd: cmd, logf: logf, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return p, nil
}

// Pid is the process id (nsenter execs the command, so it is the component's own).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited is closed when the process has ended.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Alive reports whether the process still runs.
func (p *Proc) Alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM, waits up to grace, then kills the process group. It returns the process's
// exit error when it ended other than through our signal (nil for a clean exit or our signal).
func (p *Proc) Stop(grace time.Duration) error {
	p.stopOnce.Do(func() {
		if !p.Alive() {
			return
		}
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(grace):
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.exited
		}
	})
	<-p.exited
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return nil
		}
	}
	return p.err
}

// Tail returns up to the last n bytes of the process's log.
func (p *Proc) Tail(n int) string {
	return TailFile(p.LogPath, n)
}

// TailFile returns up to the last n bytes of a file ("" when it cannot be read).
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
		return "...\n" + string(b)
	}
	return string(b)
}
