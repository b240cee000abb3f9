package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version is set at link time: go build -ldflags "-X main.version=v0.1.0" ./cmd/sluice
var version = "dev"

type versionInfo struct {
	Version  string            `json:"version"`
	Go       string            `json:"go"`
	Platform string            `json:"platform"`
	Module   string            `json:"module,omitempty"`
	ModVer   string            `json:"moduleVersion,omitempty"`
	Settings map[string]string `json:"settings,omitempty"` // vcs.revision, vcs.time, vcs.modified, ...
}

func currentVersion() versionInfo {
	v := versionInfo{Version: version, Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		v.Module, v.ModVer = bi.Main.Path, bi.Main.Version
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs", "vcs.revision", "vcs.time", "vcs.modified", "CGO_ENABLED":
				if v.Settings == nil {
					v.Settings = make(map[string]string)
				}
				v.Settings[s.Key] = s.Value
			}
		}
	}
	return v
}

type versionOptions struct {
	output string
}

func newVersionCmd() *cobra.Command {
	o := &versionOptions{}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version, the Go version and build information",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	cmd.Flags().StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func (o *versionOptions) run(cmd *cobra.Command) error {
	if err := checkOutput(o.output, "text", "json"); err != nil {
		return err
	}
	v := currentVersion()
	out := cmd.OutOrStdout()
	if o.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	fmt.Fprintf(out, "sluice %s\ngo: %s %s\n", v.Version, v.Go, v.Platform)
	if v.Module != "" {
		fmt.Fprintf(out, "module: %s %s\n", v.Module, v.ModVer)
	}
	for _, k := range []string{"vcs.revision", "vcs.time", "vcs.modified"} {
		if s, ok := v.Settings[k]; ok {
			fmt.Fprintf(out, "%s: %s\n", k, s)
		}
	}
	return nil
}
