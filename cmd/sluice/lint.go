package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/sluice-dev/sluice/policy"
)

type lintOptions struct {
	statePath, output string
	strict            bool
}

func newLintCmd() *cobra.Command {
	o := &lintOptions{}
	cmd := &cobra.Command{
		Use:   "lint --state FILE",
		Short: "Check policies against the seed's best practices and for rules that cannot work",
		Long: `lint loads and validates FILE (as explain does) and reports, per policy or namespace:

  default-deny-ingress    warning  a namespace with pods but no podSelector: {} policy for Ingress
  default-deny-egress     info     ... and none for Egress
  dns-egress              warning  pods isolated for egress that may not reach UDP port 53 (info: TCP 53)
  policy-selects-nothing  warning  a podSelector that matches no pod
  peer-matches-nothing    warning  a from/to peer (not an ipBlock) that matches no pod
  named-port-unresolved   warning  a named port that no pod the rule can reach defines
  shadowed-rule           warning  a rule whose peers and ports another rule of the policy covers

Findings are printed and the exit status is 0; with --strict it is 1 when there is a warning.
Bad input exits 2, like every command.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	f := cmd.Flags()
	f.StringVar(&o.statePath, "state", "", "state file (- for stdin): multi-document YAML or a kind: List of Namespaces, Pods and NetworkPolicies")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	f.BoolVar(&o.strict, "strict", false, "exit 1 when there is at least one warning")
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func (o *lintOptions) run(cmd *cobra.Command) error {
	if err := checkOutput(o.output, "text", "json"); err != nil {
		return err
	}
	st, err := loadState(cmd, o.statePath)
	if err != nil {
		return err
	}
	findings := policy.Lint(st)
	warnings, infos := 0, 0
	for _, f := range findings {
		if f.Level == policy.LevelWarning {
			warnings++
		} else {
			infos++
		}
	}
	out := cmd.OutOrStdout()
	if o.output == "json" {
		if findings == nil {
			findings = []policy.Finding{}
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(findings); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		for _, f := range findings {
			where := f.Namespace
			if f.Policy != "" {
				where += "/" + f.Policy
			}
			if where == "" {
				where = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Level, where, f.Check, f.Message)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintf(out, "%d warning(s), %d info(s)\n", warnings, infos)
	}
	if o.strict && warnings > 0 {
		return &exitCodeError{code: exitFindings, msg: fmt.Sprintf("lint: %d warning(s) with --strict", warnings)}
	}
	return nil
}
