package main

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary play the harness's sub-process roles, exactly as the bench
// binary re-executes itself under `ip netns exec`.
func TestMain(m *testing.M) {
	runRole(os.Args[1:])
	os.Exit(m.Run())
}

type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestQuickSmoke runs the quick harness end to end on a tiny bounded configuration: real
// connections through a real lab with no filter, the bare NFQUEUE loop and, when the agent
// builds, sluice; then checks the JSON line the contract promises.
func TestQuickSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the harness needs root (network namespaces, iptables)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	o := options{quick: true, runs: 1, duration: 500 * time.Millisecond, clients: []int{2},
		policies: []int{10}, base: 10, out: os.DevNull}
	sum, err := run(ctx, o, testLog{t})
	if err != nil {
		t.Fatalf("quick run: %v", err)
	}
	line, err := json.Marshal(sum)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(line, &got); err != nil {
		t.Fatalf("JSON line does not parse: %v\n%s", err, line)
	}
	for _, k := range []string{"sluice_vs_bare_nfqueue", "sluice_vs_no_filter", "sluice_offload_vs_no_filter",
		"sluice_vs_c_nfqueue", "bare_vs_c_nfqueue"} {
		if _, ok := got[k]; !ok {
			t.Errorf("JSON line lacks %q: %s", k, line)
		}
	}
	rates, _ := got["conn_per_s"].(map[string]any)
	for _, k := range []string{"no_filter", "bare_nfqueue", "c_nfqueue", "bare_nfq"} {
		if v, _ := rates[k].(float64); v <= 0 {
			t.Errorf("conn_per_s.%s = %v, want a positive rate: %s", k, rates[k], line)
		}
	}
	if sum.SluiceNotMeasuredBy != "" {
		t.Logf("sluice was not measured: %v", sum.Notes)
		return
	}
	for _, k := range []string{"sluice", "sluice_offload"} {
		if v, _ := rates[k].(float64); v <= 0 {
			t.Errorf("the agent exists but conn_per_s.%s = %v: %s", k, rates[k], line)
		}
	}
	if sum.BareVsC == nil || *sum.BareVsC <= 0 {
		t.Errorf("bare_vs_c_nfqueue is %v, want a positive ratio: %s", sum.BareVsC, line)
	}
	for k, p := range map[string]*float64{"sluice_vs_bare_nfqueue": sum.SluiceVsBare, "sluice_vs_no_filter": sum.SluiceVsNoFilter,
		"sluice_vs_c_nfqueue": sum.SluiceVsC} {
		if p == nil || *p <= 0 {
			t.Errorf("%s is %v, want a positive ratio: %s", k, p, line)
		}
	}
}
