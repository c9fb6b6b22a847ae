package e2e_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/e2e/framework"
)

// trellisctl runs the CLI against the e2e cluster as its administrator
// (a client certificate), reaching the controller's secure metrics
// endpoint directly (the controller runs as a local process here, so there
// is no pod to port-forward to).
func trellisctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.CommandContext(ctxT(t), env.Bins["trellisctl"], append(args, "--kubeconfig", env.Cluster.Kubeconfig,
		"--controller-address", fmt.Sprintf("127.0.0.1:%d", framework.MetricsPort))...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("trellisctl %s: %v", strings.Join(args, " "), err)
	}
	return string(out), 0
}

// TestTrellisctlProxyStatusAndConfigDump: stock Envoy sidecars show up in
// proxy-status as SYNCED on every type, and what Envoy itself reports in
// its /config_dump is what config-dump says the control plane serves it.
func TestTrellisctlProxyStatusAndConfigDump(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "reviews", 1)
	eventuallyHTTP(t, "reviews reachable", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://reviews/", "--count", "3") }, appAnswered)

	synced := regexp.MustCompile(regexp.QuoteMeta(ns) + `\s+client\s+(sotw|delta)\s+SYNCED\s+SYNCED\s+SYNCED\s+SYNCED\s+SYNCED\s`)
	var out string
	var code int
	eventually(t, "the client's sidecar SYNCED on every type", func() (bool, string) {
		out, code = trellisctl(t, "proxy-status", "-n", ns)
		return code == 0 && synced.MatchString(out) && strings.Contains(out, "reviews-"), out
	})
	t.Logf("trellisctl proxy-status -n %s:\n%s", ns, out)

	// Envoy's own view, from its admin endpoint inside the pod.
	raw := execClient(t, ns, "client", "app", "--url", "http://127.0.0.1:15000/config_dump?include_eds", "--count", "1")
	var res struct {
		Code int             `json:"code"`
		Body json.RawMessage `json:"body"`
		Raw  string          `json:"raw"`
	}
	if err := json.Unmarshal(raw[:strings.IndexByte(string(raw), '\n')+1], &res); err != nil || res.Code != 200 || len(res.Body) == 0 {
		t.Fatalf("Envoy /config_dump: %v, code %d: %.300s", err, res.Code, raw)
	}
	dump := filepath.Join(t.TempDir(), "envoy-config-dump.json")
	if err := os.WriteFile(dump, res.Body, 0o600); err != nil {
		t.Fatal(err)
	}
	out, code = trellisctl(t, "config-dump", "-n", ns, "client", "--from-file", dump)
	t.Logf("trellisctl config-dump --from-file (Envoy's own dump):\n%s", out)
	if code != 0 || !strings.Contains(out, "✔ the proxy runs what the control plane serves") {
		t.Errorf("served and applied differ (exit %d):\n%s", code, out)
	}
	for _, typ := range []string{"listeners", "routes", "clusters", "endpoints", "secrets"} {
		if !regexp.MustCompile(`(?m)^` + typ + `: ([1-9]\d*) served, ([1-9]\d*) applied, ([1-9]\d*) the same$`).MatchString(out) {
			t.Errorf("config-dump compared no %s", typ)
		}
	}
	// The comparison can fail: a dump from the other pod differs.
	otherPod := podNames(t, ns, "reviews-")[0]
	out, code = trellisctl(t, "config-dump", "-n", ns, otherPod, "--from-file", dump)
	if code != 1 || !strings.Contains(out, "served, not applied") {
		t.Errorf("another proxy's dump compared equal (exit %d):\n%s", code, out)
	}
}
