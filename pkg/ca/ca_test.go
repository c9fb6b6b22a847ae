package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trellis-mesh/trellis/pkg/ca"
)

func parse(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("not PEM")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestWorkloadCertificateContents(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC))
	root, err := ca.NewSelfSigned("example.org", 24*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	iss := &ca.Issuer{Backend: root, Clock: clk, Metrics: ca.NewIssuerMetrics()}
	id := "spiffe://example.org/ns/shop/sa/frontend"
	got, err := iss.Issue(context.Background(), id, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	cert := parse(t, got.CertPEM)
	if len(cert.URIs) != 1 || cert.URIs[0].String() != id || len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.EmailAddresses) != 0 {
		t.Errorf("SANs: URIs %v DNS %v IPs %v", cert.URIs, cert.DNSNames, cert.IPAddresses)
	}
	if cert.IsCA {
		t.Error("a workload certificate must not be a CA")
	}
	if cert.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		t.Error("no digitalSignature key usage")
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("key is %T, want ECDSA P-256", cert.PublicKey)
	}
	if want := clk.Now().Add(2 * time.Minute); !cert.NotAfter.Equal(want) || !got.NotAfter.Equal(want) {
		t.Errorf("NotAfter %v, want %v", cert.NotAfter, want)
	}
	if !cert.NotBefore.Before(clk.Now()) {
		t.Errorf("NotBefore %v is not before now (clock skew allowance)", cert.NotBefore)
	}
	pool := x509.NewCertPool()
	pool.AddCert(root.Root())
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: clk.Now(), KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for %v: %v", usage, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: clk.Now().Add(3 * time.Minute)}); err == nil {
		t.Error("the certificate verifies after it expired")
	}
	if n := testutil.ToFloat64(iss.Metrics.Issued); n != 1 {
		t.Errorf("issued metric %v", n)
	}
}

func TestSignRejectsCSRsForOtherIdentities(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	root, err := ca.NewSelfSigned("example.org", time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	want := spiffeid.RequireFromString("spiffe://example.org/ns/a/sa/x")
	for _, tt := range []struct {
		name string
		csr  x509.CertificateRequest
	}{
		{"another URI", x509.CertificateRequest{URIs: []*url.URL{{Scheme: "spiffe", Host: "example.org", Path: "/ns/a/sa/admin"}}}},
		{"an extra DNS name", x509.CertificateRequest{URIs: []*url.URL{want.URL()}, DNSNames: []string{"kubernetes.default"}}},
		{"no SAN", x509.CertificateRequest{}},
	} {
		der, err := x509.CreateCertificateRequest(rand.Reader, &tt.csr, key)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := root.Sign(context.Background(), der, want, time.Minute); err == nil {
			t.Errorf("%s: signed", tt.name)
		}
	}
}

func TestRotateAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(100 * time.Minute)
	for _, tt := range []struct {
		percent int32
		jitter  float64
		want    time.Duration
	}{
		{50, 0, 50 * time.Minute},
		{50, 0.999999, 60 * time.Minute},
		{80, 0.5, 85 * time.Minute},
	} {
		got := ca.RotateAt(nb, na, tt.percent, tt.jitter).Sub(nb)
		if got.Round(time.Second) != tt.want {
			t.Errorf("RotateAt(%d%%, %v) = %v, want %v", tt.percent, tt.jitter, got, tt.want)
		}
	}
}

// FuzzSPIFFEID feeds identities to the issuer: it must reject malformed
// ones with an error, never panic, and issue exactly the identity asked for.
func FuzzSPIFFEID(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/a/sa/b", "spiffe://x", "http://cluster.local/ns/a", "", "spiffe://UPPER/ns/a", "spiffe://td/ns/a/../b"} {
		f.Add(s)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	root, err := ca.NewSelfSigned("cluster.local", time.Hour, clk)
	if err != nil {
		f.Fatal(err)
	}
	iss := &ca.Issuer{Backend: root, Clock: clk, Metrics: ca.NewIssuerMetrics()}
	f.Fuzz(func(t *testing.T, id string) {
		got, err := iss.Issue(context.Background(), id, time.Minute)
		if err != nil {
			return
		}
		cert := parse(t, got.CertPEM)
		if len(cert.URIs) != 1 || cert.URIs[0].String() != id {
			t.Fatalf("asked for %q, got %v", id, cert.URIs)
		}
	})
}

// BenchmarkIssue issues certificates for 1,000 distinct identities with the
// built-in backend and reports the p50 and p99 issuance latency (key
// generation, CSR and signing).
func BenchmarkIssue(b *testing.B) {
	clk := clock.RealClock{}
	root, err := ca.NewSelfSigned("cluster.local", time.Hour, clk)
	if err != nil {
		b.Fatal(err)
	}
	iss := &ca.Issuer{Backend: root, Clock: clk, Metrics: ca.NewIssuerMetrics()}
	b.ReportAllocs()
	var lat []time.Duration
	for b.Loop() {
		for i := range 1000 {
			start := time.Now()
			if _, err := iss.Issue(context.Background(), fmt.Sprintf("spiffe://cluster.local/ns/ns-%d/sa/sa-%d", i%50, i), 24*time.Hour); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// TestCrossSignedServingChain: after a root rotation a serving certificate
// from the new root verifies against the old root alone (through the
// cross-signed certificate it carries) and against the new root alone; a
// Secret whose cross-signed certificate certifies another key is refused.
func TestCrossSignedServingChain(t *testing.T) {
	clk := clock.RealClock{}
	old, err := ca.NewSelfSigned("cluster.local", time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	next, err := ca.NewSelfSigned("cluster.local", 2*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	cross, err := old.CrossSign(next)
	if err != nil {
		t.Fatal(err)
	}
	data, err := next.SecretData()
	if err != nil {
		t.Fatal(err)
	}
	data[ca.CrossSignedKey] = cross
	loaded, err := ca.LoadSecret(data, clk)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := loaded.IssueServing([]string{"trellis-xds.trellis-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for rest := issued.CertPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	if len(chain) != 2 {
		t.Fatalf("serving chain has %d certificates, want leaf + cross-signed root", len(chain))
	}
	inter := x509.NewCertPool()
	inter.AddCert(chain[1])
	for name, root := range map[string]*ca.Authority{"old": old, "next": next} {
		pool := x509.NewCertPool()
		pool.AddCert(root.Root())
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, DNSName: "trellis-xds.trellis-system.svc"}); err != nil {
			t.Errorf("a client trusting only the %s root: %v", name, err)
		}
	}
	other, err := ca.NewSelfSigned("cluster.local", time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	wrong, err := old.CrossSign(other)
	if err != nil {
		t.Fatal(err)
	}
	data[ca.CrossSignedKey] = wrong
	if _, err := ca.LoadSecret(data, clk); err == nil {
		t.Error("a cross-signed certificate for another key was accepted")
	}
	// A new root named like the current one cannot be linked to it.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: old.Root().Subject, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	twin, err := ca.Load(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), clk)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.SameSubject(old, twin) || ca.SameSubject(old, next) {
		t.Errorf("SameSubject: twin %v, next %v", ca.SameSubject(old, twin), ca.SameSubject(old, next))
	}
	if _, err := old.CrossSign(twin); err == nil {
		t.Error("cross-signed a root with the current root's subject")
	}
	// Without a cross-signed certificate the chain is the leaf alone.
	plain, err := next.IssueServing([]string{"x"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(plain.CertPEM), "BEGIN CERTIFICATE"); n != 1 {
		t.Errorf("%d certificates without a rotation", n)
	}
}
