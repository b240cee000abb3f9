package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/sluice-dev/sluice/policy"
)

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "sluice",
		Short: "Kubernetes NetworkPolicy enforced in user space through NFQUEUE, and explained",
		Long: `sluice enforces Kubernetes NetworkPolicy on nodes that cannot run eBPF (sluice agent), and
answers "would this flow be allowed, and why?" from the same engine, offline, from a state file:
multi-document YAML or a kind: List, e.g.

  kubectl get pods,namespaces,networkpolicies -A -o yaml > state.yaml
  sluice explain --state state.yaml --from production/frontend --to production/backend --port 8080/TCP

Exit status: 0 success (whatever the verdict), 1 lint --strict found warnings, 2 bad input or
any other failure.`,
		SilenceUsage:  true, // a wrong flag deserves one line, not the whole help
		SilenceErrors: true, // run prints the error once, prefixed
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return fmt.Errorf("%w (see %s --help)", err, cmd.CommandPath())
	})
	// Each command is an options struct, the flags bound to it, and its run method.
	root.AddCommand(newAgentCmd(), newExplainCmd(), newMatrixCmd(), newLintCmd(), newVersionCmd())
	return root
}

// loadState reads a state file ("-" for standard input), printing its notes (ignored kinds and the like) on stderr so
// that stdout stays machine-readable.
func loadState(cmd *cobra.Command, path string) (*policy.State, error) {
	if path == "" {
		return nil, fmt.Errorf("--state FILE is required (e.g. from kubectl get pods,namespaces,networkpolicies -A -o yaml)")
	}
	var (
		st    *policy.State
		notes []string
		err   error
	)
	if path == "-" {
		// kubectl get pods,namespaces,networkpolicies -A -o yaml | sluice lint --state -
		st, notes, err = policy.Load(cmd.InOrStdin(), "<stdin>")
	} else {
		st, notes, err = policy.LoadFile(path)
	}
	for _, n := range notes {
		fmt.Fprintln(cmd.ErrOrStderr(), "note:", n)
	}
	return st, err
}

// checkOutput rejects an -o value the command does not know.
func checkOutput(got string, allowed ...string) error {
	for _, a := range allowed {
		if got == a {
			return nil
		}
	}
	return fmt.Errorf("-o %q is not supported; use one of %v", got, allowed)
}
