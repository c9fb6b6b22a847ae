package e2e_test

import (
	"fmt"
	"strings"
	"testing"
)

// setupEcho deploys echo v1 (replicas) behind Service echo and a client pod,
// and waits until both run.
func setupEcho(t *testing.T, replicas int32, args ...string) string {
	t.Helper()
	ns := meshNamespace(t)
	create(t, serviceAccount(ns, "echo"), serviceAccount(ns, "client"), echoService(ns, "echo"), echoDeployment(ns, "echo", "v1", replicas, args...), clientPod(ns, "client", "client"))
	waitEndpoints(t, ns, "echo", int(replicas))
	waitRunning(t, ns, "client")
	return ns
}

// TestReachability: with no policy, a meshed client reaches every replica
// of a meshed Service over mTLS, and the server sees the client's identity.
func TestReachability(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 2)
	// Every batch must succeed entirely; the batch that counts is the first
	// one after the client has received both endpoints (EndpointSlices are
	// ready before the push reaches the client).
	var pods map[string]int
	eventually(t, "both replicas answer", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=40")
		ok, codes, _ := summarize(rs)
		if ok != 40 {
			t.Fatalf("%d/40 calls succeeded, failures %v, e.g. %s", ok, codes, firstError(rs))
		}
		pods = map[string]int{}
		for _, r := range rs {
			pods[r.Pod]++
			if want := "spiffe://cluster.local/ns/" + ns + "/sa/client"; r.SPIFFEID != want {
				t.Fatalf("server saw peer %q, want %q", r.SPIFFEID, want)
			}
		}
		return len(pods) == 2, fmt.Sprintf("answers came from %v", pods)
	})
	t.Logf("40/40 calls over mTLS, spread %v", pods)
}

// TestStrictMTLS: under Strict mTLS (the default) a plaintext client is
// refused, a meshed one succeeds.
func TestStrictMTLS(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 1)
	ip := podIP(t, ns, "echo")
	rs := call(t, ns, "client", "--plaintext", "--target="+ip+":50051", "--n=3", "--wait-for-ready=false", "--timeout=3s")
	ok, codes, _ := summarize(rs)
	if ok != 0 {
		t.Fatalf("%d plaintext calls got through", ok)
	}
	t.Logf("plaintext calls refused: %v (%s)", codes, strings.SplitN(firstError(rs), ":", 2)[0])
	rs = call(t, ns, "client", target(ns, "echo"), "--n=3")
	if ok, _, _ := summarize(rs); ok != 3 {
		t.Fatalf("meshed calls: %d/3, e.g. %s", ok, firstError(rs))
	}
}
