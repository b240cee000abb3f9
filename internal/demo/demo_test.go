package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The seed's expectations, read by hand, for flows whose answer is easy to get wrong.
func TestExpectReadsTheSeed(t *testing.T) {
	byName := map[string]*member{}
	for _, e := range application() {
		byName[e.name] = e
	}
	cases := []struct {
		src, dst string
		want     bool
	}{
		{"internet", "frontend", true},    // ingress from anywhere on 80
		{"frontend", "backend", true},     // the chain
		{"backend", "database", true},     //
		{"frontend", "database", false},   // frontend egress: backend and DNS only
		{"backend", "coredns", false},     // backend egress has no DNS rule in the seed
		{"frontend", "coredns", true},     // DNS to any pod in any namespace
		{"frontend", "internet", false},   // DNS rule names pods, not the internet
		{"decoy", "backend", false},       // frontend labels, wrong namespace
		{"database", "internet", true},    // database is not isolated for egress
		{"prometheus", "database", false}, // seed's three-tier has no monitoring allowance
	}
	for _, c := range cases {
		s, d := byName[c.src], byName[c.dst]
		if got, why := expect(s, d, d.proto, d.port); got != c.want {
			t.Errorf("expect(%s -> %s %v/%d) = %v (%s), want %v", c.src, c.dst, d.proto, d.port, got, why, c.want)
		}
	}
}

// TestDemo runs what `make demo` runs: the real agent on the three-tier app in a lab, every flow
// checked against the seed. It builds the sluice binary itself so it needs nothing prepared.
func TestDemo(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "sluice")
	build := exec.Command("go", "build", "-o", bin, "github.com/sluice-dev/sluice/cmd/sluice")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/sluice: %v\n%s", err, out)
	}
	code, err := run(bin, "../../deploy/examples/three-tier.yaml", 3*time.Second, 100, false) // generous: CI runs packages side by side
	if code != 0 || err != nil {
		t.Fatalf("demo: exit %d: %v", code, err)
	}
	if lastLabID == "" {
		t.Fatal("run did not build a lab")
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), lastLabID) {
		t.Errorf("namespaces of the demo's lab %s remain:\n%s", lastLabID, out)
	}
}
