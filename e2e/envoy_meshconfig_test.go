package e2e_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/e2e/framework"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// TestEnvoyMeshConfigModes runs the sidecar scenarios that need a
// MeshConfig other than the defaults (a cluster singleton, so not in
// parallel with other tests): Permissive mTLS, RegistryOnly egress with
// ExternalServices and TLS origination (an unmeshed pod's IP blocked, a
// meshed one's reachable over mTLS), JSON access logs, then Strict with
// defaultAccess Deny.
func TestEnvoyMeshConfigModes(t *testing.T) {
	requireEnv(t)
	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}, Spec: meshv1alpha1.MeshConfigSpec{
		MTLS:           meshv1alpha1.MTLS{Mode: meshv1alpha1.MTLSPermissive},
		OutboundPolicy: meshv1alpha1.OutboundRegistryOnly,
		AccessLog:      &meshv1alpha1.AccessLog{Encoding: "JSON"},
	}}
	create(t, mc)
	t.Cleanup(func() { _ = env.Cluster.Client().Delete(ctxT(t), mc) })

	// A test CA the Envoy image trusts (its system bundle plus the test
	// root), and an HTTPS server outside the mesh with a certificate for
	// secure.example.test.
	dir := t.TempDir()
	authority, err := ca.NewSelfSigned("example.test", time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	serving, err := authority.IssueServing([]string{"secure.example.test"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	system, err := os.ReadFile(translate.SystemCABundle)
	if err != nil {
		t.Fatalf("the host has no %s to build the Envoy image's bundle from (install ca-certificates): %v", translate.SystemCABundle, err)
	}
	bundle, cert, key := filepath.Join(dir, "bundle.pem"), filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	for f, b := range map[string][]byte{bundle: append(system, authority.RootPEM()...), cert: serving.CertPEM, key: serving.KeyPEM} {
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(env.SetImageFile(framework.EnvoyImage, translate.SystemCABundle, bundle))

	ns := setupHTTP(t, "web", 1)
	outside := httpClientPod(ns, "outside", "client", false)
	outside.Spec.Containers[0].Args = []string{"serve", "--http-port=8080", "--tls-port=8443", "--tls-cert=" + cert, "--tls-key=" + key}
	create(t, outside)
	waitRunning(t, ns, "outside")
	outsideIP := podIP(t, ns, "outside")
	env.AddHost("plain.example.test", netip.MustParseAddr(outsideIP))
	env.AddHost("secure.example.test", netip.MustParseAddr(outsideIP))
	env.AddHost("unlisted.example.test", netip.MustParseAddr(outsideIP))
	webIP := podIP(t, ns, "web-v1")

	t.Run("Permissive: plaintext from an unmeshed pod is accepted, a forged XFCC is replaced", func(t *testing.T) {
		rs := eventuallyHTTP(t, "plaintext accepted", func() []httpResult {
			return httpCall(t, ns, "outside", "--url", "http://"+webIP+":8080/", "--header", "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/kube-system/sa/admin", "--count", "5")
		}, allCode(200))
		if xfcc := rs[0].Body.header("x-forwarded-client-cert"); strings.Contains(xfcc, "admin") {
			t.Errorf("the app saw the forged x-forwarded-client-cert %q", xfcc)
		}
		rs = eventuallyHTTP(t, "meshed call", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://web/", "--count", "5") }, allCode(200))
		if xfcc := rs[0].Body.header("x-forwarded-client-cert"); !strings.Contains(xfcc, "/sa/client") {
			t.Errorf("a meshed call under Permissive: x-forwarded-client-cert %q, want the client's identity (mTLS)", xfcc)
		}
	})
	t.Run("RegistryOnly: unknown destinations are refused until an ExternalService names them", func(t *testing.T) {
		eventuallyHTTP(t, "unknown host blocked", func() []httpResult {
			return httpCall(t, ns, "client", "--url", "http://unlisted.example.test:8080/", "--count", "3", "--timeout", "2s")
		}, func(rs []httpResult) (bool, string) { c := codes(rs); return c[200] == 0, fmt.Sprint(c) })
		rs := httpCall(t, ns, "client", "--url", "http://"+outsideIP+":8080/", "--count", "3", "--timeout", "2s")
		if c := codes(rs); c[200] != 0 {
			t.Errorf("an unknown IP was reachable: %v", c)
		}
		// A meshed pod's IP is a mesh member: reachable, over mTLS.
		rs = httpCall(t, ns, "client", "--url", "http://"+webIP+":8080/", "--count", "3", "--timeout", "3s")
		if c := codes(rs); c[200] != 3 || !strings.Contains(rs[0].Body.header("x-forwarded-client-cert"), "/sa/client") {
			t.Errorf("a meshed pod IP under RegistryOnly: %v, XFCC %q (%s)", c, rs[0].Body.header("x-forwarded-client-cert"), firstHTTPError(rs, 200))
		}
		create(t, &meshv1alpha1.ExternalService{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "example"},
			Spec:       meshv1alpha1.ExternalServiceSpec{Hosts: []string{"plain.example.test"}, Ports: []meshv1alpha1.ExternalPort{{Number: 8080, Protocol: meshv1alpha1.ExternalHTTP}}},
		}, &meshv1alpha1.ExternalService{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "secure"},
			Spec: meshv1alpha1.ExternalServiceSpec{Hosts: []string{"secure.example.test"}, Ports: []meshv1alpha1.ExternalPort{{
				Number: 80, Protocol: meshv1alpha1.ExternalHTTP, TargetPort: ptr.To[int32](8443), TLS: &meshv1alpha1.TLSOrigination{},
			}}},
		})
		rs = eventuallyHTTP(t, "listed host", func() []httpResult {
			return httpCall(t, ns, "client", "--url", "http://plain.example.test:8080/", "--count", "3")
		}, allCode(200))
		t.Logf("plain.example.test:8080 via its ExternalService: 3/3, the server saw Host %q", rs[0].Body.Host)
		rs = eventuallyHTTP(t, "TLS origination", func() []httpResult {
			return httpCall(t, ns, "client", "--url", "http://secure.example.test/", "--count", "3")
		}, allCode(200))
		t.Logf("plaintext http://secure.example.test/ from the app: the sidecar originated TLS (server saw %s)", rs[0].Body.Proto)
		if rs[0].Body.Proto == "" {
			t.Errorf("no echo from the HTTPS server")
		}
		rs = httpCall(t, ns, "client", "--url", "http://unlisted.example.test:8080/", "--count", "3", "--timeout", "2s")
		if c := codes(rs); c[200] != 0 {
			t.Errorf("a host no ExternalService names was reachable: %v", c)
		}
	})
	t.Run("access log: JSON lines with the documented keys on the sidecar's stdout", func(t *testing.T) {
		httpCall(t, ns, "client", "--url", "http://web/logged?x=1", "--count", "3")
		eventually(t, "access log lines", func() (bool, string) {
			n, bad := 0, ""
			for _, d := range podDirs(ns, "web-v1") {
				f, err := os.Open(filepath.Join(d, "trellis-proxy.log"))
				if err != nil {
					return false, err.Error()
				}
				sc := bufio.NewScanner(f)
				for sc.Scan() {
					if !strings.HasPrefix(sc.Text(), "{") {
						continue
					}
					var line map[string]any
					if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
						bad = sc.Text()
						continue
					}
					if line["path"] == "/logged?x=1" {
						for _, k := range []string{"start_time", "method", "protocol", "response_code", "response_flags", "bytes_received", "bytes_sent", "duration_ms", "authority", "upstream_host", "upstream_cluster", "peer_identity", "request_id"} {
							if _, ok := line[k]; !ok {
								bad = fmt.Sprintf("key %s missing in %s", k, sc.Text())
							}
						}
						if !strings.Contains(fmt.Sprint(line["peer_identity"]), "/sa/client") {
							bad = fmt.Sprintf("peer_identity %v", line["peer_identity"])
						}
						n++
					}
				}
				f.Close()
			}
			return n >= 3 && bad == "", fmt.Sprintf("%d lines for /logged; %s", n, bad)
		})
	})
	t.Run("Strict with defaultAccess Deny: nothing reaches web until an AccessPolicy allows it", func(t *testing.T) {
		mc.Spec = meshv1alpha1.MeshConfigSpec{MTLS: meshv1alpha1.MTLS{Mode: meshv1alpha1.MTLSStrict}, DefaultAccess: meshv1alpha1.DefaultAccessDeny,
			AccessLog: &meshv1alpha1.AccessLog{Encoding: "Text"}}
		update(t, mc)
		eventuallyHTTP(t, "denied", func() []httpResult {
			return httpCall(t, ns, "client", "--url", "http://web/", "--count", "3", "--timeout", "2s")
		},
			func(rs []httpResult) (bool, string) { c := codes(rs); return c[200] == 0, fmt.Sprint(c) })
		rs := httpCall(t, ns, "outside", "--url", "http://"+webIP+":8080/", "--count", "3", "--timeout", "2s")
		if c := codes(rs); c[0] != 3 {
			t.Errorf("plaintext under Strict: %v, want refused", c)
		}
		create(t, &meshv1alpha1.AccessPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-client"},
			Spec: meshv1alpha1.AccessPolicySpec{TargetRefs: targets("web"), Action: meshv1alpha1.AccessAllow, Rules: []meshv1alpha1.AccessRule{{
				From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "client"}}},
			}}},
		})
		eventuallyHTTP(t, "allowed", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://web/", "--count", "5") }, allCode(200))
	})
	t.Run("access log: text lines in the documented format on the sidecar's stdout", func(t *testing.T) {
		httpCall(t, ns, "client", "--url", "http://web/text-logged", "--count", "3")
		// translate.AccessLogTextFormat: [start] "METHOD PATH PROTOCOL" code flags
		// received sent duration "authority" "upstream host" cluster "peer" "request id"
		line := regexp.MustCompile(`^\[[0-9T:.Z-]+\] "GET /text-logged HTTP/1\.1" 200 - \d+ \d+ \d+ "web" "[0-9.]+:8080" inbound\|8080\|\|\S* "spiffe://cluster\.local/ns/` + ns + `/sa/client" "[0-9a-f-]+"$`)
		eventually(t, "text access log lines", func() (bool, string) {
			n, last := 0, ""
			for _, d := range podDirs(ns, "web-v1") {
				for _, l := range strings.Split(readFile(filepath.Join(d, "trellis-proxy.log")), "\n") {
					if strings.Contains(l, "/text-logged") {
						last = l
						if line.MatchString(l) {
							n++
						}
					}
				}
			}
			return n >= 3, fmt.Sprintf("%d matching lines; last: %s", n, last)
		})
	})
}
