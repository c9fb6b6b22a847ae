package e2e_test

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// TestKubectlExecAndLogs: kubectl exec and kubectl logs work against the
// e2e cluster as on a real one — the apiserver proxies them, over TLS with
// client certificates both ways, to the stand-in kubelet's API. An exec'd
// command runs inside the pod: its hostname is the pod's name, its calls
// are captured by the pod's Envoy sidecar (the app's Service answers
// through mTLS, the server sees the client's SPIFFE ID), a command's exit
// status comes back as kubectl's, and stdin reaches it.
func TestKubectlExecAndLogs(t *testing.T) {
	requireEnv(t)
	ns := setupHTTP(t, "web", 1)
	kubectl := func(stdin string, args ...string) (string, error) {
		cmd := exec.CommandContext(ctxT(t), env.Cluster.Kubectl, append([]string{"--kubeconfig", env.Cluster.Kubeconfig, "-n", ns}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		var out, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &stderr
		err := cmd.Run()
		if err != nil {
			t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
		}
		return out.String(), err
	}
	out, err := kubectl("", "exec", "client", "-c", "app", "--", "hostname")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "client" {
		t.Errorf("hostname in the pod = %q, want the pod's name client", got)
	}
	// The image's own command (httpecho client) through the sidecar.
	out, err = kubectl("", "exec", "client", "-c", "app", "--", "httpecho", "client", "--url", "http://web/x", "--count", "1")
	if err != nil {
		t.Fatal(err)
	}
	rs := jsonLines[httpResult](t, []byte(out))
	if len(rs) != 1 || rs[0].Code != 200 {
		t.Fatalf("httpecho client through kubectl exec: %+v", rs)
	}
	if xfcc := rs[0].Body.header("x-forwarded-client-cert"); !strings.Contains(xfcc, "/ns/"+ns+"/sa/client") {
		t.Errorf("the call did not go through the client's sidecar with mTLS: x-forwarded-client-cert %q", xfcc)
	}
	_, err = kubectl("", "exec", "client", "-c", "app", "--", "sh", "-c", "exit 3")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("kubectl exec of `exit 3`: %v, want exit status 3", err)
	}
	if out, err = kubectl("piped through\n", "exec", "-i", "client", "-c", "app", "--", "cat"); err != nil || out != "piped through\n" {
		t.Errorf("stdin through kubectl exec -i: %q, %v", out, err)
	}
	// The sidecar is a container too (a restartable init container).
	if out, err = kubectl("", "exec", "client", "-c", "trellis-proxy", "--", "id", "-u"); err != nil || strings.TrimSpace(out) != "1337" {
		t.Errorf("id -u in the sidecar container: %q, %v (want 1337)", out, err)
	}
	// Envoy's own log (it warns at start-up that no connection limit is set).
	full, err := kubectl("", "logs", "client", "-c", "trellis-proxy")
	if err != nil || !strings.Contains(full, "[main]") {
		t.Errorf("kubectl logs of the sidecar: %q, %v", full, err)
	}
	lines := strings.Split(strings.TrimSpace(full), "\n")
	if out, err = kubectl("", "logs", "client", "-c", "trellis-proxy", "--tail", "1"); err != nil || strings.TrimSpace(out) != lines[len(lines)-1] {
		t.Errorf("kubectl logs --tail 1 of the sidecar: %q, %v; want its last line %q", out, err, lines[len(lines)-1])
	}
}
