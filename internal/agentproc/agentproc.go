// Package agentproc runs a `sluice agent` as a child process, the way the demo, the end-to-end
// tests and the cluster tests need it: output captured line by line, readiness read from the
// agent's own /readyz inside the namespace it runs in, and one way to stop it (SIGCONT in case it
// was stopped, SIGTERM, SIGKILL after a grace period) that is safe to call more than once.
package agentproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultMetricsAddr is where the agent serves /readyz unless told otherwise (its own default).
const DefaultMetricsAddr = "127.0.0.1:9963"

// Proc is one running agent.
type Proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // from Wait, valid once done is closed

	mu    sync.Mutex
	lines []string
	part  bytes.Buffer // an unterminated last line

	stopOnce sync.Once
	killed   bool // set by the first Stop, read after stopOnce
}

// Start starts cmd (prepared by the caller, e.g. with netlab's NodeCommand, so it runs in the
// right network namespace) with its stdout and stderr captured.
func Start(cmd *exec.Cmd) (*Proc, error) {
	p := &Proc{cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p, p
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Write collects output; both streams share it, so lines keep their order.
func (p *Proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			p.part.Write(b)
			break
		}
		p.part.Write(b[:i])
		p.lines = append(p.lines, p.part.String())
		p.part.Reset()
		b = b[i+1:]
	}
	return n, nil
}

// Lines is every complete line written so far.
func (p *Proc) Lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := append([]string(nil), p.lines...)
	if p.part.Len() > 0 {
		out = append(out, p.part.String())
	}
	return out
}

// Output is everything written so far.
func (p *Proc) Output() string { return strings.Join(p.Lines(), "\n") }

// Tail is the last n bytes of the output, for failure messages.
func (p *Proc) Tail(n int) string {
	s := p.Output()
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	return s
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ExitCode is the exit status once exited (-1 when killed by a signal or still running).
func (p *Proc) ExitCode() int {
	if !p.Exited() || p.cmd.ProcessState == nil {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// Err is what waiting for the process returned (nil while it runs or after a clean exit).
func (p *Proc) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig syscall.Signal) error { return p.cmd.Process.Signal(sig) }

// Wait waits up to timeout for the process to exit and returns its exit code.
func (p *Proc) Wait(timeout time.Duration) (int, error) {
	select {
	case <-p.done:
		return p.ExitCode(), nil
	case <-time.After(timeout):
		return -1, fmt.Errorf("still running after %s", timeout)
	}
}

// Stop ends the process: SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, and
// SIGKILL when it has not exited after grace. It reports whether SIGKILL was needed. Later
// calls wait for the first one's outcome and report the same.
func (p *Proc) Stop(grace time.Duration) (killed bool) {
	p.stopOnce.Do(func() {
		if p.Exited() {
			return
		}
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			p.killed = true
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	<-p.done
	return p.killed
}

// WaitLog waits until the output contains substr. It fails early when the process exits.
func (p *Proc) WaitLog(substr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if strings.Contains(p.Output(), substr) {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("the agent exited (%v) before logging %q", p.err, substr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agent did not log %q within %s", substr, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// InNamespace runs f with the calling OS thread in the agent's network namespace (netlab's
// Host.Do), so that sockets f opens live there.
type InNamespace func(f func() error) error

// HTTPClient returns a client whose connections are opened inside the namespace.
func HTTPClient(in InNamespace, timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := in(func() (err error) {
				c, err = (&net.Dialer{Timeout: timeout}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
}

// WaitReady polls http://addr/readyz from inside the namespace until it answers 200, the agent
// exits, or timeout passes; it returns how long readiness took.
func (p *Proc) WaitReady(in InNamespace, addr string, timeout time.Duration) (time.Duration, error) {
	client := HTTPClient(in, time.Second)
	defer client.CloseIdleConnections()
	start := time.Now()
	last := "no answer yet"
	for {
		if p.Exited() {
			return 0, fmt.Errorf("the agent exited (%v) before it was ready", p.err)
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(start), nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(body))
		} else {
			last = err.Error()
		}
		if time.Since(start) > timeout {
			return 0, errors.New("the agent was not ready after " + timeout.String() + " (last /readyz: " + last + ")")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
