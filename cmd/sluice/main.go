// Command sluice enforces Kubernetes NetworkPolicy in user space (sluice agent) and answers
// questions about policies offline (explain, matrix, lint).
//
// Exit status, as with diff(1): 0 success (whatever the verdict), 1 `lint --strict` found
// warnings, 2 bad input or any other failure.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// SIGINT and SIGTERM cancel the command's context (cmd.Context()), so long-running commands
	// such as the agent can remove what they installed before exiting.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit statuses.
const (
	exitOK       = 0
	exitFindings = 1
	exitError    = 2
)

// exitCodeError ends the program with a chosen status instead of the default exitError.
type exitCodeError struct {
	code int
	msg  string
}

func (e *exitCodeError) Error() string { return e.msg }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	var ce *exitCodeError
	if errors.As(err, &ce) {
		if ce.msg != "" {
			fmt.Fprintln(stderr, "sluice:", ce.msg)
		}
		return ce.code
	}
	fmt.Fprintln(stderr, "sluice:", err)
	return exitError
}
