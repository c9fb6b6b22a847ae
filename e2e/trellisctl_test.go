package e2e_test

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/e2e/framework"
)

// trellisctl runs the CLI against the e2e cluster as its administrator
// (a client certificate), reaching the controller's secure metrics
// endpoint directly (the controller runs as a local process here).
func trellisctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return trellisctlVia(t, append(args, "--controller-address", net.JoinHostPort(framework.GatewayIP, strconv.Itoa(framework.MetricsPort)))...)
}

// trellisctlVia runs the CLI as the administrator with args as they are.
func trellisctlVia(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.CommandContext(ctxT(t), env.Bins["trellisctl"], append(args, "--kubeconfig", env.Cluster.Kubeconfig)...)
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

	// Envoy's own view, from its admin endpoint inside the pod, compared
	// with what is served. Parallel tests change the mesh all the time, so a
	// push may land between the two reads: compare again until they agree
	// (a real difference never does).
	dump := filepath.Join(t.TempDir(), "envoy-config-dump.json")
	eventually(t, "Envoy's own config dump equals what is served", func() (bool, string) {
		raw, err := env.Kubelet.EnvoyAdmin(ctxT(t), ns, "client", "/config_dump?include_eds")
		if err != nil || !json.Valid(raw) {
			t.Fatalf("Envoy /config_dump: %v: %.300s", err, raw)
		}
		if err := os.WriteFile(dump, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		out, code = trellisctl(t, "config-dump", "-n", ns, "client", "--from-file", dump)
		return code == 0 && strings.Contains(out, "✔ the proxy runs what the control plane serves"), out
	})
	t.Logf("trellisctl config-dump --from-file (Envoy's own dump):\n%s", out)
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

	// Without --controller-address, trellisctl port-forwards to every
	// running controller pod through the apiserver (pods/portforward, to
	// the kubelet). The controller runs outside the cluster here (its
	// Deployment's pods stay Pending), so a pod labelled as a controller in
	// its namespace relays its metrics port to it.
	relay := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: framework.ControllerNamespace, Name: "controller-relay", Labels: map[string]string{
			"app.kubernetes.io/name": "trellis", "app.kubernetes.io/component": "controller", "trellis.dev/inject": "disabled"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "relay", Image: framework.HTTPEchoImage, Command: []string{"httpecho"},
			Args:  []string{"relay", "--listen=:8443", "--to=" + net.JoinHostPort(framework.GatewayIP, strconv.Itoa(framework.MetricsPort))},
			Ports: []corev1.ContainerPort{{Name: "metrics", ContainerPort: 8443}},
		}}},
	}
	create(t, relay)
	t.Cleanup(func() { _ = env.Cluster.Client().Delete(context.Background(), relay) })
	waitRunning(t, relay.Namespace, relay.Name)
	// The states are not asserted here: parallel tests change Services, so a
	// push may be in flight (STALE) at that instant.
	out, code = trellisctlVia(t, "proxy-status", "-n", ns)
	t.Logf("trellisctl proxy-status through a port-forward:\n%s", out)
	if code != 0 || !regexp.MustCompile(`client\s+(sotw|delta)\s+(SYNCED|STALE).*\scontroller-relay\n`).MatchString(out) {
		t.Errorf("proxy-status through a port-forward (exit %d):\n%s", code, out)
	}
}
