package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"k8s.io/utils/clock"
)

// Authority is a certificate authority whose root key is held in memory.
type Authority struct {
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	clock clock.PassiveClock
	// cross is this root cross-signed by the root it replaced (see
	// CrossSign); serving certificates carry it so that clients which
	// still trust only the previous root can verify them.
	cross *x509.Certificate
}

// NewSelfSigned creates a root for the trust domain, valid for validity.
func NewSelfSigned(trustDomain string, validity time.Duration, clk clock.PassiveClock) (*Authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := clk.Now()
	sn := serial()
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		// Each root has its own subject (its serial number in hex): after
		// a root rotation OpenSSL and BoringSSL clients pick issuers by
		// name, and two roots of one name break the cross-signed chain.
		Subject:               pkix.Name{Organization: []string{"trellis"}, CommonName: fmt.Sprintf("Trellis root CA %s %.8x", trustDomain, sn)},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: trustDomain}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Authority{cert: cert, key: key, clock: clk}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return n
}

// Root is the CA certificate.
func (a *Authority) Root() *x509.Certificate { return a.cert }

// RootPEM is the CA certificate in PEM.
func (a *Authority) RootPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cert.Raw})
}

// Issued is a certificate with its private key, both PEM encoded.
type Issued struct {
	CertPEM   []byte
	KeyPEM    []byte
	NotBefore time.Time
	NotAfter  time.Time
}

// TLSCertificate returns the pair for crypto/tls.
func (i *Issued) TLSCertificate() (tls.Certificate, error) {
	return tls.X509KeyPair(i.CertPEM, i.KeyPEM)
}

// IssueWorkload issues an X.509 SVID: the SPIFFE ID as the only SAN,
// usable as client and server certificate.
func (a *Authority) IssueWorkload(spiffeID string, ttl time.Duration) (*Issued, error) {
	u, err := url.Parse(spiffeID)
	if err != nil || u.Scheme != "spiffe" {
		return nil, fmt.Errorf("invalid SPIFFE ID %q", spiffeID)
	}
	return a.issue(&x509.Certificate{
		URIs:        []*url.URL{u},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, ttl)
}

// IssueServing issues a server certificate for the names, each a DNS name
// or an IP address.
//
// While the root has a valid cross-signed certificate from its
// predecessor, the chain carries it: a client that read its trust bundle
// before a root rotation (Envoy reads its xDS channel's roots once, at
// start) still verifies the control plane after the rotation.
func (a *Authority) IssueServing(names []string, ttl time.Duration) (*Issued, error) {
	var dnsNames []string
	var ips []net.IP
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else {
			dnsNames = append(dnsNames, n)
		}
	}
	issued, err := a.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: first(names)},
		DNSNames:    dnsNames,
		IPAddresses: ips,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ttl)
	if err == nil && a.cross != nil && a.clock.Now().Before(a.cross.NotAfter) {
		issued.CertPEM = append(issued.CertPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cross.Raw})...)
	}
	return issued, err
}

// SameSubject reports whether two roots have one subject name. A rotation
// between them cannot be made seamless: OpenSSL and BoringSSL (Envoy,
// gRPC C++) find issuers by name, so a cross-signed certificate from one to
// the other looks self-issued and chains through it fail to verify.
func SameSubject(a, b *Authority) bool { return bytes.Equal(a.cert.RawSubject, b.cert.RawSubject) }

// CrossSign certifies next's root key with this root: a CA certificate
// with next's subject, key and key identifier, issued by this root and
// valid until either root expires. Served after a serving certificate from
// next, it links that certificate to this root for clients that trust only
// this one; clients that trust next build the shorter path.
func (a *Authority) CrossSign(next *Authority) ([]byte, error) {
	n := next.cert
	if SameSubject(a, next) {
		return nil, fmt.Errorf("the new root's subject %q is the current root's: give it another subject", n.Subject)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               n.Subject,
		SubjectKeyId:          n.SubjectKeyId,
		NotBefore:             a.clock.Now().Add(-time.Minute),
		NotAfter:              n.NotAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  n.URIs,
	}
	if tmpl.NotAfter.After(a.cert.NotAfter) {
		tmpl.NotAfter = a.cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, n.PublicKey, a.key)
	if err != nil {
		return nil, fmt.Errorf("cross-sign the next root: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// sign signs a certificate for pub from tmpl, valid from a minute ago
// (clock skew between hosts) for ttl, never past the root.
func (a *Authority) sign(tmpl *x509.Certificate, pub any, ttl time.Duration) ([]byte, time.Time, error) {
	now := a.clock.Now()
	tmpl.SerialNumber = serial()
	tmpl.NotBefore = now.Add(-time.Minute)
	tmpl.NotAfter = now.Add(ttl)
	if tmpl.NotAfter.After(a.cert.NotAfter) {
		tmpl.NotAfter = a.cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, pub, a.key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("sign certificate: %w", err)
	}
	return der, tmpl.NotAfter, nil
}

func (a *Authority) issue(tmpl *x509.Certificate, ttl time.Duration) (*Issued, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, _, err := a.sign(tmpl, &key.PublicKey, ttl)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Issued{
		CertPEM:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		NotBefore: tmpl.NotBefore,
		NotAfter:  tmpl.NotAfter,
	}, nil
}
