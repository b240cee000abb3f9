package agentproc

import (
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestLinesAndExit(t *testing.T) {
	p, err := Start(exec.Command("sh", "-c", "echo one; echo two >&2; printf three; exit 7"))
	if err != nil {
		t.Fatal(err)
	}
	code, err := p.Wait(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}
	got := p.Lines()
	if strings.Join(got, ",") != "one,two,three" {
		t.Errorf("lines %q, want one, two, three (the unterminated last line included)", got)
	}
	if err := p.WaitLog("two", time.Second); err != nil {
		t.Error(err)
	}
	if err := p.WaitLog("never", time.Second); err == nil {
		t.Error("WaitLog on an exited process found a line that was never written")
	}
}

func TestStopEscalatesToKill(t *testing.T) {
	// A child that ignores SIGTERM, as a wedged agent would.
	p, err := Start(exec.Command("sh", "-c", `trap "" TERM; echo up; while :; do sleep 0.1; done`))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitLog("up", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if !p.Stop(300 * time.Millisecond) {
		t.Error("Stop did not report the SIGKILL it needed")
	}
	if !p.Exited() {
		t.Fatal("still running after Stop")
	}
	if p.ExitCode() != -1 {
		t.Errorf("exit code %d, want -1 (killed)", p.ExitCode())
	}
	// A second Stop returns at once with the same outcome.
	if !p.Stop(time.Hour) || time.Since(start) > time.Minute {
		t.Error("second Stop did not return the first outcome")
	}
}

func TestStopGraceful(t *testing.T) {
	p, err := Start(exec.Command("sh", "-c", `trap "echo bye; exit 0" TERM; echo up; while :; do sleep 0.1; done`))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WaitLog("up", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if p.Stop(10 * time.Second) {
		t.Error("Stop killed a process that exits on SIGTERM")
	}
	if p.ExitCode() != 0 || !strings.Contains(p.Output(), "bye") {
		t.Errorf("exit %d, output %q: want a clean exit after the TERM handler", p.ExitCode(), p.Output())
	}
}
