package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/trellis-mesh/trellis/pkg/analyze"
)

var update = flag.Bool("update", false, "rewrite the golden outputs in testdata/")

func trellisctl(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, strings.NewReader(stdin), &out, &errOut)
	return code, out.String(), errOut.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./cmd/trellisctl -update)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s differs (-want +got; -update after reading it):\n%s", path, diff)
	}
}

// TestAnalyzeSamples: the demo's manifests (what make demo applies) have
// no problem.
func TestAnalyzeSamples(t *testing.T) {
	for _, dir := range []string{"demo", "demo-proxyless"} {
		code, out, errOut := trellisctl(t, "", "analyze", "-f", filepath.Join("..", "..", "config", "samples", dir), "-n", "demo")
		if code != 0 {
			t.Errorf("analyze config/samples/%s: exit %d\n%s%s", dir, code, out, errOut)
		}
		if dir == "demo" {
			golden(t, "analyze-demo.txt", out)
		}
	}
}

// TestAnalyzeBroken: a set of manifests with the usual mistakes; every
// problem is reported once, with its object, field and reason, and the
// exit status is 1.
func TestAnalyzeBroken(t *testing.T) {
	code, out, errOut := trellisctl(t, "", "analyze", "-f", "testdata/broken")
	if code != 1 {
		t.Errorf("exit %d, want 1\n%s", code, errOut)
	}
	golden(t, "analyze-broken.txt", out)

	code, out, _ = trellisctl(t, "", "analyze", "-f", "testdata/broken", "-o", "json")
	if code != 1 {
		t.Errorf("-o json: exit %d, want 1", code)
	}
	var rep analyze.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("-o json is not JSON: %v\n%s", err, out)
	}
	want := map[string]string{ // object field → reason, one each
		"BackendPolicy/shop/reviews ":                                            "InvalidObject",
		"AccessPolicy/shop/reviews-callers spec.rules[0].from[0].serviceAccount": analyze.ReasonUnknownIdentity,
		"BackendPolicy/shop/payments spec.targetRefs[0]":                         "TargetNotFound",
		"Deployment/shop/ratings ":                                               analyze.ReasonUnmeshedStrict,
		"Deployment/shop/reviews ":                                               analyze.ReasonInjection,
		"HTTPRoute/shop/reviews-canary spec.parentRefs[0].group":                 analyze.ReasonParentGroup,
		"HTTPRoute/shop/reviews-regex spec.rules[0].matches[0].path.value":       "UnsupportedValue",
		"HTTPRoute/shop/reviews-split spec.parentRefs[0].port":                   "NoMatchingParent",
		"HTTPRoute/shop/reviews-split spec.rules[0].backendRefs[0]":              "BackendNotFound",
		"Service/shop/details spec.selector":                                     analyze.ReasonNoPods,
		"Service/shop/ratings ":                                                  analyze.ReasonNotInjected,
		"Service/shop/ratings spec.ports[0]":                                     analyze.ReasonPortProtocol,
	}
	seen := map[string]int{}
	for _, f := range rep.Findings {
		key := f.Object.String() + " " + f.Field
		seen[key]++
		if want[key] != f.Reason {
			t.Errorf("unexpected finding %s [%s]: %s", key, f.Reason, f.Message)
		}
	}
	for key := range want {
		if seen[key] != 1 {
			t.Errorf("%s reported %d times, want once", key, seen[key])
		}
	}

	// --fail-on none never fails; warnings alone fail with --fail-on warning.
	if code, _, _ := trellisctl(t, "", "analyze", "-f", "testdata/broken", "--fail-on", "none"); code != 0 {
		t.Errorf("--fail-on none: exit %d", code)
	}
	warnOnly := "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {selector: {app: db}, ports: [{name: db, port: 5432}]}\n"
	if code, out, _ := trellisctl(t, warnOnly, "analyze", "-f", "-"); code != 0 || !strings.Contains(out, "0 errors, 2 warnings") {
		t.Errorf("warnings only: exit %d\n%s", code, out)
	}
	if code, _, _ := trellisctl(t, warnOnly, "analyze", "-f", "-", "--fail-on", "warning"); code != 1 {
		t.Errorf("warnings only with --fail-on warning: exit %d, want 1", code)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{{"analyze"}, {"analyze", "-f", "x", "-o", "xml"}, {"analyze", "-f", "x", "--fail-on", "sometimes"}} {
		code, _, errOut := trellisctl(t, "", args...)
		if code != 2 || !strings.Contains(errOut, "Error: ") || !strings.Contains(errOut, "Usage:") {
			t.Errorf("%v: exit %d, stderr %q; want 2 with the problem and the usage", args, code, errOut)
		}
	}
	if code, _, errOut := trellisctl(t, "", "analyze", "-f", "does-not-exist"); code != 1 || !strings.Contains(errOut, "does-not-exist") {
		t.Errorf("missing path: exit %d, stderr %q", code, errOut)
	}
	if code, out, _ := trellisctl(t, "", "version"); code != 0 || !strings.HasPrefix(out, "trellisctl ") {
		t.Errorf("version: exit %d, %q", code, out)
	}
	if code, out, _ := trellisctl(t, "", "--help"); code != 0 || !strings.Contains(out, "analyze") {
		t.Errorf("--help: exit %d, %q", code, out)
	}
}

// TestDescribeRequest follows requests through the configuration built
// from testdata/describe and the demo, one golden output per case: the
// route rule that matched, the backends, mTLS and the identity required,
// the AccessPolicy rule that allowed or denied.
func TestDescribeRequest(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string // a line the output must have
	}{
		{"allowed", []string{"frontend", "http://reviews/"}, "AccessPolicy: allowed by shop/reviews-callers/rules/0"},
		{"header-match-timeout", []string{"deployment/frontend", "http://reviews.shop.svc.cluster.local/", "-H", "x-version: v2"}, "timeout 2s"},
		{"denied-by-deny-rule", []string{"frontend", "http://reviews/admin/users", "-X", "DELETE"}, "denied by Deny rule shop/no-admin/rules/0"},
		{"caller-left-out", []string{"ratings", "http://reviews/"}, "body         access denied by Trellis: AccessPolicy shop/"},
		{"pod-ip", []string{"frontend", "http://10.244.0.4:8080/"}, "cluster      podip|10.244.0.4:8080"},
		{"external", []string{"frontend", "http://api.payments.example.com/pay"}, "outbound|80||api.payments.example.com"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, out, errOut := trellisctl(t, "", append([]string{"describe", "request", "-f", "testdata/describe", "-n", "shop"}, c.args...)...)
			if code != 0 || errOut != "" {
				t.Fatalf("exit %d, stderr %q", code, errOut)
			}
			if !strings.Contains(out, c.want) {
				t.Errorf("output lacks %q:\n%s", c.want, out)
			}
			golden(t, "describe-"+c.name+".txt", out)
		})
	}
	code, out, _ := trellisctl(t, "", "describe", "request", "-f", "../../config/samples/demo", "-n", "demo", "frontend", "http://reviews/")
	if code != 0 || !strings.Contains(out, "weight 80") || !strings.Contains(out, "allowed by demo/reviews-from-frontend/rules/0") {
		t.Errorf("the demo's frontend → reviews: exit %d\n%s", code, out)
	}
	for _, bad := range [][]string{
		{"nobody", "http://reviews/"},   // no such workload
		{"frontend", "http://nowhere/"}, // no such host
		{"frontend", "ftp://reviews/"},  // scheme
		{"frontend", "tcp://reviews"},   // tcp needs a port
		{"frontend", "http://reviews/", "-H", "no colon"},
	} {
		code, _, errOut := trellisctl(t, "", append([]string{"describe", "request", "-f", "testdata/describe", "-n", "shop"}, bad...)...)
		if code == 0 || !strings.Contains(errOut, "Error: ") {
			t.Errorf("%v: exit %d, stderr %q; want an error saying what to write", bad, code, errOut)
		}
	}
}
