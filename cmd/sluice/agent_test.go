package main

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
)

// Flag mistakes are reported before anything touches the kernel (the real agent runs in
// test/e2e, as root, inside a network-namespace lab).
func TestAgentBadFlags(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	t.Setenv("KUBECONFIG", "")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"agent", "--state", "x.yaml", "--mode", "all"}, "--mode"},
		{[]string{"agent", "--state", "x.yaml", "--log-format", "xml"}, "--log-format"},
		{[]string{"agent", "--state", "x.yaml", "--queues", "0"}, "--queues"},
		{[]string{"agent", "--state", "x.yaml", "--queue-num", "65535", "--queues", "2"}, "--queues"},
		{[]string{"agent"}, "NODE_NAME"},
		{[]string{"agent", "extra"}, "unknown command"},
	} {
		_, stderr, code := runCLI(t, tc.args...)
		if code != exitError || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d mentioning %q", tc.args, code, stderr, exitError, tc.want)
		}
	}
}

func TestAgentIsRegistered(t *testing.T) {
	out, _, code := runCLI(t, "agent", "--help")
	if code != exitOK || !strings.Contains(out, "--cut-established") || !strings.Contains(out, "fail-open") {
		t.Fatalf("agent --help: exit %d\n%s", code, out)
	}
}

// The agent's cleanup stack undoes newest first, runs every step even after a failure, and
// reports the failures.
func TestCleanupsRunNewestFirst(t *testing.T) {
	var got []string
	var c cleanups
	for _, name := range []string{"offload", "queues", "rules"} {
		c.push(name, func() error {
			got = append(got, name)
			if name == "queues" {
				return errors.New("queues failed")
			}
			return nil
		})
	}
	err := c.run(slog.New(slog.DiscardHandler))
	if strings.Join(got, ",") != "rules,queues,offload" {
		t.Errorf("order %v, want rules, queues, offload", got)
	}
	if err == nil || !strings.Contains(err.Error(), "queues failed") {
		t.Errorf("error %v, want the failing step's", err)
	}
	got = nil
	if err := c.run(slog.New(slog.DiscardHandler)); err != nil || len(got) != 0 {
		t.Errorf("a second run undid %v again (err %v)", got, err)
	}
}
