package ca

import (
	"context"
	"crypto/tls"
	"sync/atomic"
	"time"
)

// ServingCertificate is a control-plane listener's certificate (xDS, the
// self-issued webhook one): signed by the current signer for Names, served
// to every new TLS handshake, renewed at half its lifetime by Renewals and
// re-issued at once by Renewals.Refresh after a root rotation step.
type ServingCertificate struct {
	Names    []string
	Lifetime time.Duration
	// Signer returns the authority that signs now (Rotating.Signer).
	Signer func() *Authority
	cert   atomic.Pointer[tls.Certificate]
}

// Issue signs a certificate; serving it makes it the one handshakes get.
// It is an IssueFunc.
func (s *ServingCertificate) Issue(context.Context) (Issuance, error) {
	issued, err := s.Signer().IssueServing(s.Names, s.Lifetime)
	if err != nil {
		return Issuance{}, err
	}
	pair, err := issued.TLSCertificate()
	if err != nil {
		return Issuance{}, err
	}
	return Issuance{
		RotateAt: RotateAt(issued.NotAfter.Add(-s.Lifetime), issued.NotAfter, 50, 0),
		Serve:    func() { s.cert.Store(&pair) },
	}, nil
}

// IssueNow issues and serves a certificate before any listener starts;
// it returns when to renew it.
func (s *ServingCertificate) IssueNow() (time.Time, error) {
	is, err := s.Issue(context.Background())
	if err != nil {
		return time.Time{}, err
	}
	is.Serve()
	return is.RotateAt, nil
}

// GetCertificate is for tls.Config.
func (s *ServingCertificate) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.cert.Load(), nil
}
