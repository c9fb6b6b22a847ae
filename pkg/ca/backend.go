package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// Backend signs workload certificate requests; it is the one thing a CA
// backend implements (the built-in Authority, or cert-manager). Approval,
// key generation, metrics and retries live once, in Issuer.
type Backend interface {
	// Sign returns the PEM chain (leaf first) for a CSR whose only SAN is
	// the URI id, valid for ttl at most.
	Sign(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]byte, error)
	// BundlePEM is the trust bundle: every root workloads must trust.
	BundlePEM(ctx context.Context) ([]byte, error)
}

// Sign implements Backend for the built-in authority: it checks the CSR's
// signature and that its only SAN is the identity being issued.
func (a *Authority) Sign(_ context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]byte, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature: %w", err)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != id.String() || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("CSR must carry exactly the URI SAN %s", id)
	}
	der, notAfter, err := a.sign(&x509.Certificate{
		URIs:        []*url.URL{csr.URIs[0]},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, csr.PublicKey, ttl)
	if err != nil {
		return nil, err
	}
	_ = notAfter
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// BundlePEM implements Backend.
func (a *Authority) BundlePEM(context.Context) ([]byte, error) { return a.RootPEM(), nil }

// IssuerMetrics are the CA's metrics.
type IssuerMetrics struct {
	Issued   prometheus.Counter
	Latency  prometheus.Histogram
	Expiry   *prometheus.GaugeVec
	Failures *prometheus.CounterVec
}

// NewIssuerMetrics creates the metrics; register Collectors with a registry.
func NewIssuerMetrics() *IssuerMetrics {
	return &IssuerMetrics{
		Issued: prometheus.NewCounter(prometheus.CounterOpts{Name: "trellis_ca_certificates_issued_total", Help: "Workload certificates issued."}),
		Latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "trellis_ca_issuance_seconds", Help: "Time to issue a workload certificate (key generation and signing).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		Expiry:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "trellis_ca_certificate_expiry_timestamp_seconds", Help: "Soonest expiry of the certificates served to each identity."}, []string{"identity"}),
		Failures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_ca_issuance_failures_total", Help: "Failed issuances, by reason (issue or rotate)."}, []string{"reason"}),
	}
}

// Collectors lists the metrics for registration.
func (m *IssuerMetrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Issued, m.Latency, m.Expiry, m.Failures}
}

// Issuer does the work around a Backend: it generates the workload's key
// in memory, builds the CSR, asks the backend to sign and records metrics.
// The key is returned to the caller (the xDS server, which sends it on the
// workload's authenticated stream) and never stored anywhere else.
type Issuer struct {
	Backend Backend
	Clock   clock.PassiveClock
	Metrics *IssuerMetrics
}

// Issue issues an X.509 SVID for id, valid for ttl.
func (i *Issuer) Issue(ctx context.Context, id string, ttl time.Duration) (*Issued, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return nil, fmt.Errorf("identity %q: %w", id, err)
	}
	start := i.Clock.Now()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{sid.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR for %s: %w", id, err)
	}
	chain, err := i.Backend.Sign(ctx, csrDER, sid, ttl)
	if err != nil {
		i.Metrics.Failures.WithLabelValues("issue").Inc()
		return nil, fmt.Errorf("issue certificate for %s: %w", id, err)
	}
	block, _ := pem.Decode(chain)
	if block == nil {
		return nil, errors.New("backend returned no certificate")
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("backend returned an invalid certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	i.Metrics.Issued.Inc()
	i.Metrics.Latency.Observe(i.Clock.Since(start).Seconds())
	return &Issued{
		CertPEM:   chain,
		KeyPEM:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
	}, nil
}

// RotateAt is when a certificate valid from notBefore to notAfter should be
// renewed: after percent of its lifetime plus a jitter of up to 10 points
// (jitter in [0,1)), so proxies issued together do not renew together.
func RotateAt(notBefore, notAfter time.Time, percent int32, jitter float64) time.Time {
	life := notAfter.Sub(notBefore)
	frac := (float64(percent) + 10*jitter) / 100
	return notBefore.Add(time.Duration(float64(life) * frac))
}
