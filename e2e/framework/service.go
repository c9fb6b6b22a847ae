package framework

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
)

// The controller's Services, as kube-proxy would serve them: proxies dial
// GatewayIP:XDSPort and the apiserver calls the webhooks at
// 127.0.0.1:WebhookPort; DNAT rules in the host's nat table (chain
// serviceChain, jumped to from PREROUTING for pods and OUTPUT for this
// host) send each new connection to one of the ready replicas, in turn.
// DNAT keeps the client's address, so the xDS server still sees the pod's
// IP. A replica leaves the rules when it exits or is stopped and joins them
// when it is ready, as an EndpointSlice would follow its readiness;
// established connections are conntrack's and stay where they are.
const serviceChain = "TRELLIS-E2E-SVC"

// replicaPort is replica i's own port for a Service port.
func replicaPort(servicePort, i int) int { return servicePort + 100 + i }

type services struct {
	mu    sync.Mutex
	ready []int // replica indexes, sorted
}

func iptables(args ...string) error {
	out, err := exec.Command("iptables", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// newServices creates the chain and its jumps, empty (no replica ready:
// connections are refused, as nothing listens on the Service ports).
func newServices() (*services, error) {
	cleanupServices()
	if err := iptables("-t", "nat", "-N", serviceChain); err != nil {
		return nil, err
	}
	for _, hook := range []string{"PREROUTING", "OUTPUT"} {
		if err := iptables("-t", "nat", "-I", hook, "-j", serviceChain); err != nil {
			cleanupServices()
			return nil, err
		}
	}
	return &services{}, nil
}

// cleanupServices removes the chain (and what an earlier, killed run left).
func cleanupServices() {
	for _, hook := range []string{"PREROUTING", "OUTPUT"} {
		for iptables("-t", "nat", "-D", hook, "-j", serviceChain) == nil {
		}
	}
	_ = iptables("-t", "nat", "-F", serviceChain)
	_ = iptables("-t", "nat", "-X", serviceChain)
}

// setReady adds (ready) or removes replica i and rewrites the chain in one
// iptables-restore transaction.
func (s *services) setReady(i int, ready bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, found := slices.BinarySearch(s.ready, i)
	switch {
	case ready && !found:
		s.ready = slices.Insert(s.ready, j, i)
	case !ready && found:
		s.ready = slices.Delete(s.ready, j, j+1)
	default:
		return nil
	}
	var b strings.Builder
	// --noflush: other chains stay; a declared chain is flushed.
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n", serviceChain)
	for _, svc := range []struct {
		host string
		port int
	}{{GatewayIP, XDSPort}, {"127.0.0.1", WebhookPort}} {
		for k, r := range s.ready {
			// Round robin: the k-th rule takes every (n-k)-th of the
			// connections that reach it; the last takes the rest.
			nth := ""
			if left := len(s.ready) - k; left > 1 {
				nth = fmt.Sprintf(" -m statistic --mode nth --every %d --packet 0", left)
			}
			fmt.Fprintf(&b, "-A %s -d %s/32 -p tcp --dport %d%s -j DNAT --to-destination %s:%d\n",
				serviceChain, svc.host, svc.port, nth, svc.host, replicaPort(svc.port, r))
		}
	}
	b.WriteString("COMMIT\n")
	cmd := exec.Command("iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("iptables-restore: %v: %s\n%s", err, strings.TrimSpace(string(out)), b.String())
	}
	return nil
}
