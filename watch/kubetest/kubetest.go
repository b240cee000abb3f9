// Package kubetest starts a real kube-apiserver and etcd on 127.0.0.1 for tests (through
// controller-runtime's envtest), with the binaries that hack/kube-assets.sh builds and caches.
package kubetest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Env is a running control plane.
type Env struct {
	Env    *envtest.Environment
	Config *rest.Config
	Client kubernetes.Interface
	// Kubeconfig is the path of a kubeconfig file for the admin user.
	Kubeconfig string
	t          testing.TB
}

var (
	assetsOnce sync.Once
	assetsDir  string
	assetsErr  error
)

// Assets returns the directory holding kube-apiserver and etcd: $KUBEBUILDER_ASSETS when set,
// else what `bash hack/kube-assets.sh --print-dir` prints (which builds them on first use, a
// few minutes on a fresh machine).
func Assets() (string, error) {
	assetsOnce.Do(func() {
		if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
			assetsDir = d
			return
		}
		root, err := repoRoot()
		if err != nil {
			assetsErr = err
			return
		}
		var out bytes.Buffer
		cmd := exec.Command("bash", filepath.Join(root, "hack", "kube-assets.sh"), "--print-dir")
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			assetsErr = fmt.Errorf("hack/kube-assets.sh --print-dir: %w (set KUBEBUILDER_ASSETS to a directory with kube-apiserver and etcd to skip the build)", err)
			return
		}
		assetsDir = strings.TrimSpace(out.String())
	})
	return assetsDir, assetsErr
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "hack", "kube-assets.sh")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("hack/kube-assets.sh not found above the working directory; set KUBEBUILDER_ASSETS")
		}
		dir = parent
	}
}

// Start starts etcd and kube-apiserver and stops them when the test ends. The API server's
// certificates live in a directory of the test's, so StopAPIServer/StartAPIServer keep the same
// address and credentials, and etcd keeps the data across them.
func Start(t testing.TB) *Env {
	t.Helper()
	dir, err := Assets()
	if err != nil {
		t.Fatal(err)
	}
	logDir := t.TempDir()
	env := &envtest.Environment{
		BinaryAssetsDirectory:    dir,
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  20 * time.Second,
	}
	api := env.ControlPlane.GetAPIServer()
	api.CertDir = t.TempDir()
	// No controller manager runs, so nothing would ever reconcile the kubernetes service's
	// endpoints; the default reconciler only logs errors about it.
	api.Configure().Set("endpoint-reconciler-type", "none")
	apiLog, err := os.Create(filepath.Join(logDir, "kube-apiserver.log"))
	if err != nil {
		t.Fatal(err)
	}
	api.Out, api.Err = apiLog, apiLog
	start := time.Now()
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		t.Fatalf("starting kube-apiserver and etcd from %s: %v (log: %s)", dir, err, tail(apiLog.Name()))
	}
	t.Logf("kube-apiserver and etcd up in %v (binaries %s)", time.Since(start).Round(time.Millisecond), dir)
	e := &Env{Env: env, Config: cfg, t: t}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Logf("stopping the control plane: %v", err)
		}
		apiLog.Close()
	})
	e.Client, err = kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.Kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(e.Kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// StopAPIServer kills kube-apiserver as a crash would (SIGKILL; no graceful close of the
// watches) and waits until it is gone; etcd keeps running. A graceful stop is no quicker here:
// the API server drains its long-running watches for longer than a test wants to wait.
func (e *Env) StopAPIServer() {
	e.t.Helper()
	api := e.Env.ControlPlane.GetAPIServer()
	pid, err := findProcess("kube-apiserver", "--cert-dir="+api.CertDir)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		e.t.Fatalf("killing kube-apiserver (pid %d): %v", pid, err)
	}
	// Stop reaps the process (already dead, so it returns at once) and marks it stopped.
	if err := api.Stop(); err != nil {
		e.t.Fatalf("stopping kube-apiserver: %v", err)
	}
}

// findProcess returns the pid of the process whose executable is named name and whose command
// line holds arg (the test's own cert dir, so it is this test's API server and no other).
func findProcess(name, arg string) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(raw), "\x00")
		if filepath.Base(args[0]) == name && slices.Contains(args, arg) {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no %s process with %s", name, arg)
}

// StartAPIServer starts kube-apiserver again on the same address with the same certificates.
func (e *Env) StartAPIServer() {
	e.t.Helper()
	if err := e.Env.ControlPlane.GetAPIServer().Start(); err != nil {
		e.t.Fatalf("restarting kube-apiserver: %v", err)
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}
