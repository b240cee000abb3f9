package main

// The macro benchmark's cluster. Its two real pods (client and server) live in the lab; every
// other pod is a paper pod with an address no lab host owns, there only to make the policy set
// large. The structure is simple on purpose so the same policies can be written out exactly as
// plain iptables rules (configuration 6) and the two enforcers judge the very same thing.

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

var serverIP = netip.MustParseAddr("10.250.1.10")

// clientPods is how many client pods the lab has. NFQUEUE's --queue-balance hashes on the
// address pair and protocol only (not ports), so the connections of one pod pair always land
// on one queue: several client pods are what lets more queues share the work.
const clientPods = 4

func clientIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 250, 0, byte(10 + i)}) }

const (
	tcpPort = 8080
	udpPort = 9090
)

// fillerIPs are the paper pods of filler policy i: the selected pod and its allowed peer.
func fillerIPs(i int) (svc, cli netip.Addr) {
	return netip.AddrFrom4([4]byte{10, 252, byte(i >> 8), byte(i)}), netip.AddrFrom4([4]byte{10, 253, byte(i >> 8), byte(i)})
}

func fillerPort(i int) int32 { return 8000 + int32(i%50) }

func nsObj(name string) any {
	return corev1.Namespace{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/metadata.name": name}},
	}
}

func podObj(ns, name, app string, ip netip.Addr) any {
	return corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{NodeName: "bench-node", Containers: []corev1.Container{{Name: "c", Image: "none"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String(),
			PodIPs: []corev1.PodIP{{IP: ip.String()}}},
	}
}

func portsOf(tcp, udp int32) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	if tcp != 0 {
		p, v := corev1.ProtocolTCP, intstr.FromInt32(tcp)
		out = append(out, networkingv1.NetworkPolicyPort{Protocol: &p, Port: &v})
	}
	if udp != 0 {
		p, v := corev1.ProtocolUDP, intstr.FromInt32(udp)
		out = append(out, networkingv1.NetworkPolicyPort{Protocol: &p, Port: &v})
	}
	return out
}

// benchCluster returns the objects of a cluster with n NetworkPolicies (n >= 2): two that isolate
// and admit the real client and server (client egress to the server, server ingress from the
// client, on TCP 8080 and UDP 9090), and n-2 fillers, each isolating one paper pod for ingress
// and admitting one paper peer (from any namespace) on one TCP port.
func benchCluster(n int) []any {
	if n < 2 {
		n = 2
	}
	fill := n - 2
	nns := max(1, fill/10)
	objs := []any{nsObj("bench")}
	for k := 0; k < nns; k++ {
		objs = append(objs, nsObj(fmt.Sprintf("fill-%d", k)))
	}
	for i := 0; i < clientPods; i++ {
		objs = append(objs, podObj("bench", fmt.Sprintf("client-%d", i), "bench-client", clientIP(i)))
	}
	objs = append(objs, podObj("bench", "server", "bench-server", serverIP))
	for i := 0; i < fill; i++ {
		svc, cli := fillerIPs(i)
		ns := fmt.Sprintf("fill-%d", i%nns)
		objs = append(objs, podObj(ns, fmt.Sprintf("svc-%d", i), fmt.Sprintf("svc-%d", i), svc),
			podObj(ns, fmt.Sprintf("cli-%d", i), fmt.Sprintf("cli-%d", i), cli))
	}
	tm := metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"}
	objs = append(objs,
		networkingv1.NetworkPolicy{TypeMeta: tm, ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "server-ingress"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "bench-server"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{{
						NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "bench"}},
						PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "bench-client"}},
					}},
					Ports: portsOf(tcpPort, udpPort),
				}},
			}},
		networkingv1.NetworkPolicy{TypeMeta: tm, ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: "client-egress"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "bench-client"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "bench-server"}}}},
					Ports: portsOf(tcpPort, udpPort),
				}},
			}})
	for i := 0; i < fill; i++ {
		objs = append(objs, networkingv1.NetworkPolicy{TypeMeta: tm,
			ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("fill-%d", i%nns), Name: fmt.Sprintf("np-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("svc-%d", i)}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{{
						NamespaceSelector: &metav1.LabelSelector{},
						PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("cli-%d", i)}},
					}},
					Ports: portsOf(fillerPort(i), 0),
				}},
			}})
	}
	return objs
}

// writeState writes the cluster as a `kind: List` (JSON is YAML), the shape `kubectl get -o yaml`
// prints and the agent's --state reads.
func writeState(path string, n int) error {
	list := map[string]any{"apiVersion": "v1", "kind": "List", "items": benchCluster(n)}
	b, err := json.Marshal(list)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// iptablesPolicies renders the same n policies as an iptables-restore script for the FORWARD
// chain of the node: egress of the client, then a linear dispatch on destination address into
// one chain per isolated pod, the way a plain kernel enforcer without ipsets lays it out. The
// real server's jump sits in the middle of the dispatch list, so its packets pay for half the
// scan, as an average destination would.
func iptablesPolicies(n int) string {
	if n < 2 {
		n = 2
	}
	fill := n - 2
	var b strings.Builder
	b.WriteString("*filter\n:BENCH-EGR - [0:0]\n:BENCH-ING - [0:0]\n:E-client - [0:0]\n:I-server - [0:0]\n")
	for i := 0; i < fill; i++ {
		fmt.Fprintf(&b, ":I-%d - [0:0]\n", i)
	}
	b.WriteString("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n")
	b.WriteString("-A FORWARD -m conntrack --ctstate NEW -j BENCH-EGR\n")
	b.WriteString("-A FORWARD -m conntrack --ctstate NEW -j BENCH-ING\n")
	for i := 0; i < clientPods; i++ {
		fmt.Fprintf(&b, "-A BENCH-EGR -s %s/32 -j E-client\n", clientIP(i))
	}
	fmt.Fprintf(&b, "-A E-client -d %s/32 -p tcp --dport %d -j RETURN\n", serverIP, tcpPort)
	fmt.Fprintf(&b, "-A E-client -d %s/32 -p udp --dport %d -j RETURN\n", serverIP, udpPort)
	b.WriteString("-A E-client -j DROP\n")
	for i := 0; i <= fill; i++ {
		if i == fill/2 {
			fmt.Fprintf(&b, "-A BENCH-ING -d %s/32 -j I-server\n", serverIP)
		}
		if i < fill {
			svc, _ := fillerIPs(i)
			fmt.Fprintf(&b, "-A BENCH-ING -d %s/32 -j I-%d\n", svc, i)
		}
	}
	for i := 0; i < clientPods; i++ {
		fmt.Fprintf(&b, "-A I-server -s %s/32 -p tcp --dport %d -j ACCEPT\n", clientIP(i), tcpPort)
		fmt.Fprintf(&b, "-A I-server -s %s/32 -p udp --dport %d -j ACCEPT\n", clientIP(i), udpPort)
	}
	b.WriteString("-A I-server -j DROP\n")
	for i := 0; i < fill; i++ {
		_, cli := fillerIPs(i)
		fmt.Fprintf(&b, "-A I-%d -s %s/32 -p tcp --dport %d -j ACCEPT\n-A I-%d -j DROP\n", i, cli, fillerPort(i), i)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}
