// Package e2ek8s holds the checks of the real-cluster harness (hack/e2e-k8s.sh): that the two
// image builds agree, and the smoke run of a whole node with sluice installed from deploy/.
package e2ek8s

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func repoRoot(t *testing.T) string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// imageEnv reads hack/image.env (KEY=VALUE or KEY="VALUE" lines).
func imageEnv(t *testing.T, root string) map[string]string {
	f, err := os.Open(filepath.Join(root, "hack", "image.env"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("hack/image.env: %q is not KEY=VALUE", line)
		}
		env[k] = strings.Trim(v, `"`)
	}
	for _, k := range []string{"SLUICE_IMAGE_PACKAGES", "SLUICE_IMAGE_SUITE", "SLUICE_IMAGE_BINARY", "SLUICE_IMAGE_CMD"} {
		if env[k] == "" {
			t.Fatalf("hack/image.env has no %s", k)
		}
	}
	return env
}

// TestDockerfileMatchesOfflineImage: the Dockerfile (for users with a registry) and
// hack/images.sh (the offline build the local cluster imports) must give the same runtime
// layout: Debian suite, packages, binary path, entrypoint and command. Both read hack/image.env
// for what a shell can read; what the Dockerfile must spell out literally is checked here.
func TestDockerfileMatchesOfflineImage(t *testing.T) {
	root := repoRoot(t)
	env := imageEnv(t, root)
	raw, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	// The runtime stage is the last FROM.
	text := strings.ReplaceAll(string(raw), "\\\n", " ")
	stages := regexp.MustCompile(`(?m)^FROM `).Split(text, -1)
	final := "FROM " + stages[len(stages)-1]
	instr := map[string][]string{}
	for _, line := range strings.Split(final, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		op, rest, _ := strings.Cut(line, " ")
		instr[op] = append(instr[op], strings.TrimSpace(rest))
	}
	if want := "debian:" + env["SLUICE_IMAGE_SUITE"] + "-slim"; len(instr["FROM"]) != 1 || instr["FROM"][0] != want {
		t.Errorf("Dockerfile runtime stage FROM %v, want %s (hack/image.env's suite)", instr["FROM"], want)
	}
	if !slicesContain(instr["COPY"], "hack/image.env /tmp/image.env") {
		t.Errorf("the runtime stage does not COPY hack/image.env: %v", instr["COPY"])
	}
	installs := false
	for _, r := range instr["RUN"] {
		installs = installs || (strings.Contains(r, ". /tmp/image.env") && strings.Contains(r, "apt-get install") && strings.Contains(r, "$SLUICE_IMAGE_PACKAGES"))
	}
	if !installs {
		t.Errorf("no RUN in the runtime stage installs $SLUICE_IMAGE_PACKAGES from hack/image.env: %v", instr["RUN"])
	}
	if !slicesContain(instr["COPY"], "--from=build /out/sluice "+env["SLUICE_IMAGE_BINARY"]) {
		t.Errorf("the binary is not copied to %s: %v", env["SLUICE_IMAGE_BINARY"], instr["COPY"])
	}
	for op, want := range map[string][]string{"ENTRYPOINT": {env["SLUICE_IMAGE_BINARY"]}, "CMD": {env["SLUICE_IMAGE_CMD"]}} {
		var got []string
		if len(instr[op]) != 1 || json.Unmarshal([]byte(instr[op][0]), &got) != nil || strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("Dockerfile %s %v, want %q (hack/image.env)", op, instr[op], want)
		}
	}

	// The offline build takes every one of those from the same file.
	script, err := os.ReadFile(filepath.Join(root, "hack", "images.sh"))
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{`. "$here/image.env"`, "$SLUICE_IMAGE_SUITE", "${SLUICE_IMAGE_PACKAGES", `"$SLUICE_IMAGE_BINARY" "$SLUICE_IMAGE_CMD"`, "$work/sluice$SLUICE_IMAGE_BINARY"} {
		if !strings.Contains(string(script), ref) {
			t.Errorf("hack/images.sh does not use %s", ref)
		}
	}
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
