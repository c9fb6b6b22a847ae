package e2e_test

import (
	"fmt"
	"strings"
	"testing"
)

// TestEnvoyReachability: a meshed client calls an HTTP Service through both
// sidecars by DNS name (short and fully qualified) and by cluster IP, and
// its TCP port; under Strict mTLS (the default) the server app sees the
// caller's SPIFFE ID in x-forwarded-client-cert, set by its sidecar.
func TestEnvoyReachability(t *testing.T) {
	requireEnv(t)
	ns := setupHTTP(t, "web", 2)
	var svc = clusterIP(t, ns, "web")
	for _, url := range []string{
		"http://web/hello?x=1",
		fmt.Sprintf("http://web.%s.svc.cluster.local/hello?x=1", ns),
		fmt.Sprintf("http://%s/hello?x=1", svc),
	} {
		// Until both replicas answer: the client's sidecar may know only the
		// first endpoint right after the EndpointSlice lists both.
		rs := eventuallyHTTP(t, url, func() []httpResult { return httpCall(t, ns, "client", "--url", url, "--count", "20") }, func(rs []httpResult) (bool, string) {
			ok, why := allCode(200)(rs)
			pods := map[string]bool{}
			for _, r := range rs {
				pods[r.Pod] = true
			}
			return ok && len(pods) == 2, fmt.Sprintf("%s, answered by %d pods", why, len(pods))
		})
		pods := map[string]int{}
		for _, r := range rs {
			pods[r.Pod]++
			if r.Body.Path != "/hello" || r.Body.Query != "x=1" {
				t.Errorf("%s: the app saw path %q query %q", url, r.Body.Path, r.Body.Query)
			}
			xfcc := r.Body.header("x-forwarded-client-cert")
			if want := fmt.Sprintf("URI=spiffe://cluster.local/ns/%s/sa/client", ns); !strings.Contains(xfcc, want) {
				t.Fatalf("%s: x-forwarded-client-cert %q, want it to contain %s", url, xfcc, want)
			}
		}
		t.Logf("%s: 20/20 answered by %v", url, pods)
		if len(pods) != 2 {
			t.Errorf("%s: answered by %v, want both replicas", url, pods)
		}
	}
	rs := eventuallyHTTP(t, "tcp", func() []httpResult { return httpCall(t, ns, "client", "--tcp", "web:9000", "--count", "5") }, allCode(1))
	t.Logf("tcp: %d/5 echoed (%s)", codes(rs)[1], rs[0].Hello)
}
