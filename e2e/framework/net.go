package framework

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// The pod network: a bridge in the host's network namespace holding the
// gateway address of a test range, and one network namespace per pod with
// a veth on the bridge. Pods get a route for the test range only — no
// default route — so nothing they send can leave the machine.
const (
	Bridge    = "trellis-e2e0"
	PodCIDR   = "10.250.0.0/16"
	GatewayIP = "10.250.0.1"
	// ServiceCIDR is the apiserver's service-cluster-ip-range (envtest's
	// default). Pods route it to the bridge so that connecting to a cluster
	// IP reaches the OUTPUT chain, where trellis-init's rules hand it to the
	// sidecar; there is no kube-proxy, so an unmeshed pod cannot use cluster
	// IPs (it calls pod IPs).
	ServiceCIDR = "10.0.0.0/24"
	nsPrefix    = "trellis-e2e-"
	vethPrefix  = "te2e"
)

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// CheckPrivileges says why this machine cannot run the pod network, or nil.
func CheckPrivileges() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root to create network namespaces (run as root, e.g. sudo make e2e)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("needs the ip command (apt-get install iproute2)")
	}
	name := nsPrefix + "probe"
	_ = ip("netns", "del", name)
	if err := ip("netns", "add", name); err != nil {
		return fmt.Errorf("cannot create a network namespace: %v", err)
	}
	return ip("netns", "del", name)
}

// network allocates pod addresses and plumbs pod namespaces.
type network struct {
	mu   sync.Mutex
	next netip.Addr
	free []netip.Addr
}

// cleanupNetwork removes what an earlier, killed run may have left.
func cleanupNetwork() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], nsPrefix) {
			_ = ip("netns", "del", f[0])
			_ = os.RemoveAll(filepath.Join("/etc/netns", f[0]))
		}
	}
	_ = ip("link", "del", Bridge)
}

func newNetwork() (*network, error) {
	cleanupNetwork()
	for _, args := range [][]string{
		{"link", "add", Bridge, "type", "bridge"},
		{"addr", "add", GatewayIP + "/16", "dev", Bridge},
		{"link", "set", Bridge, "up"},
	} {
		if err := ip(args...); err != nil {
			cleanupNetwork()
			return nil, err
		}
	}
	return &network{next: netip.MustParseAddr("10.250.0.10")}, nil
}

func (n *network) close() { cleanupNetwork() }

func (n *network) alloc() netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.free) > 0 {
		a := n.free[0]
		n.free = n.free[1:]
		return a
	}
	a := n.next
	n.next = n.next.Next()
	return a
}

func (n *network) release(a netip.Addr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.free = append(n.free, a)
}

// addPod creates the network namespace of a pod with address a on eth0, and
// its resolv.conf (the search path of a pod in podNamespace).
func (n *network) addPod(id string, a netip.Addr, podNamespace string) (string, error) {
	ns := nsPrefix + id
	if err := os.MkdirAll(filepath.Join("/etc/netns", ns), 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join("/etc/netns", ns, "resolv.conf"), []byte(resolvConf(podNamespace)), 0o644); err != nil {
		return "", err
	}
	host := vethPrefix + id
	steps := [][]string{
		{"netns", "add", ns},
		{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"link", "set", host, "master", Bridge},
		{"link", "set", host, "up"},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "addr", "add", a.String() + "/16", "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
		{"-n", ns, "route", "add", ServiceCIDR, "via", GatewayIP},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			_ = ip("netns", "del", ns)
			return "", err
		}
	}
	return ns, nil
}

func (n *network) delPod(ns string) {
	_ = ip("netns", "del", ns) // the veth pair goes with it
	_ = os.RemoveAll(filepath.Join("/etc/netns", ns))
}
