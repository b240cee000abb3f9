package main

// The C baseline: bench/cnfqueue/c-nfqueue.c, the leanest accept-all loop over
// libnetfilter_queue, built here with gcc so that the benchmark shows what the kernel's NFQUEUE
// round trip costs without any Go runtime in the way.

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

//go:embed cnfqueue/c-nfqueue.c
var cLoopSource []byte

// cLoopLibs are the libraries the C loop links; hack/deps.sh installs their -dev packages.
var cLoopLibs = []string{"-lnetfilter_queue", "-lmnl", "-lpthread"}

// buildCLoop compiles the C loop once per source (and compiler flags) and returns the binary's
// path. Binaries are cached by content hash in the user's cache directory (or the temporary
// directory when there is none), so a run pays the compile only after the source changes.
func buildCLoop(ctx context.Context, tmp string) (string, error) {
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		return "", fmt.Errorf("gcc is missing: install it (Debian: apt-get install gcc)")
	}
	flags := append([]string{"-O2", "-Wall"}, cLoopLibs...)
	h := sha256.New()
	h.Write(cLoopSource)
	fmt.Fprint(h, flags)
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	dir, err := os.UserCacheDir()
	if err != nil {
		dir = os.TempDir()
	}
	dir = filepath.Join(dir, "sluice-bench")
	bin := filepath.Join(dir, "c-nfqueue-"+sum)
	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	src := filepath.Join(tmp, "c-nfqueue.c")
	if err := os.WriteFile(src, cLoopSource, 0o644); err != nil {
		return "", err
	}
	// Built beside its final name and renamed, so a concurrent or interrupted build never
	// leaves a half-written binary under the cached name.
	part := bin + fmt.Sprintf(".%d.part", os.Getpid())
	args := append([]string{"-O2", "-Wall", "-o", part, src}, cLoopLibs...)
	out, err := exec.CommandContext(ctx, gcc, args...).CombinedOutput()
	if err != nil {
		os.Remove(part)
		return "", fmt.Errorf("gcc %v: %v: %s (are libnetfilter-queue-dev and libmnl-dev installed? run hack/deps.sh)", args, err, firstLines(string(out), 5))
	}
	return bin, os.Rename(part, bin)
}
