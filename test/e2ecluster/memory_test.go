package e2ecluster

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// One tenant writes about the largest NetworkPolicy the API server stores (60,000 ports; etcd refuses 100,000)
// beside 100 pods of other nodes. Every agent compiles every policy, so this object must
// neither take the agent down nor open anything: it is beyond sluice's per-policy bounds, so
// the pods it selects stay isolated with none of its rules, and the agent's peak memory stays
// under a stated bound.
func TestWorstPolicyObjectKeepsAgentSmall(t *testing.T) {
	const maxPeakMiB = 160 // VmHWM of the agent process; the DaemonSet's limit is 512 Mi
	c := newCluster(t)
	agent := startAgent(t, c.lab, c.bin, c.env.Kubeconfig)
	agent.waitReady(t, c.lab, 60*time.Second)
	for i := 0; i < 100; i++ {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("remote-%03d", i), Namespace: "production", Labels: map[string]string{"app": "remote"}},
			Spec:       corev1.PodSpec{NodeName: "node-b", Containers: []corev1.Container{{Name: "c", Image: "x"}}},
		}
		created, err := c.env.Client.CoreV1().Pods("production").Create(c.ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ip := fmt.Sprintf("10.245.0.%d", i+1)
		created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
		if _, err := c.env.Client.CoreV1().Pods("production").UpdateStatus(c.ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	huge := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "huge", Namespace: "production"}}
	var ports []networkingv1.NetworkPolicyPort
	for i := 0; i < 60_000; i++ {
		p := intstr.FromInt32(int32(10000 + i%50000))
		ports = append(ports, networkingv1.NetworkPolicyPort{Port: &p})
	}
	huge.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: ports}}
	if _, err := c.env.Client.NetworkingV1().NetworkPolicies("production").Create(c.ctx, huge, metav1.CreateOptions{}); err != nil {
		t.Fatalf("the API server refused the object (%d ports): %v", len(ports), err)
	}
	// The pods it selects (all of production) are isolated for ingress with none of its
	// rules: every flow of the test goes into one of them, so every one is denied.
	c.waitAll(agent, "the oversized policy isolates what it selects", func(flow) bool { return false })
	if !strings.Contains(agent.tail(), "MaxPorts") {
		t.Errorf("the agent does not say which bound the policy crossed:\n%s", agent.tail())
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", agent.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range bytes.Split(status, []byte("\n")) {
		f := strings.Fields(string(l))
		if len(f) < 2 || (f[0] != "VmHWM:" && f[0] != "VmRSS:") {
			continue
		}
		kb, _ := strconv.Atoi(f[1])
		t.Logf("agent %s %.1f MiB", f[0], float64(kb)/1024)
		if f[0] == "VmHWM:" {
			found = true
			if kb > maxPeakMiB<<10 {
				t.Errorf("the agent's peak resident memory is %.1f MiB, bound %d MiB", float64(kb)/1024, maxPeakMiB)
			}
		}
	}
	if !found {
		t.Fatalf("no VmHWM in /proc/%d/status", agent.Pid())
	}
	agent.stop(t)
}
