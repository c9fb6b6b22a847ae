package ca

import (
	"cmp"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// CertManager is a Backend that asks a cert-manager Issuer or ClusterIssuer
// to sign: each CSR becomes a CertificateRequest in the control plane's
// namespace; cert-manager approves it (its approver, or a policy approver
// such as approver-policy) and the issuer signs it. The request carries only
// the CSR (a public key); the workload's private key never leaves Trellis.
// The trust bundle is the issuer's CA as cert-manager reports it
// (status.ca of the requests).
type CertManager struct {
	// Client reads and writes CertificateRequests directly (no cache).
	Client    client.Client
	Namespace string
	IssuerRef cmmeta.IssuerReference
	// Clock paces the polling of a pending request.
	Clock clock.Clock
	// Poll is how often a pending request is checked (default 200 ms).
	Poll time.Duration

	mu sync.Mutex
	ca []byte
}

// Sign implements Backend.
func (c *CertManager) Sign(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]byte, error) {
	cr := &cmapi.CertificateRequest{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: c.Namespace, GenerateName: "trellis-",
			Labels:      map[string]string{"app.kubernetes.io/managed-by": "trellis"},
			Annotations: map[string]string{"trellis.dev/spiffe-id": id.String()},
		},
		Spec: cmapi.CertificateRequestSpec{
			Request:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}),
			IssuerRef: c.IssuerRef,
			Duration:  &metav1.Duration{Duration: ttl},
			Usages:    []cmapi.KeyUsage{cmapi.UsageDigitalSignature, cmapi.UsageKeyEncipherment, cmapi.UsageServerAuth, cmapi.UsageClientAuth},
		},
	}
	// Create and delete run to completion (bounded) even when the caller
	// gives up meanwhile: a create cancelled in flight could leave a
	// request behind whose generated name nobody knows.
	bounded := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	}
	cctx, cancel := bounded()
	err := c.Client.Create(cctx, cr)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("create CertificateRequest: %w", err)
	}
	// The request has served its purpose once answered either way.
	defer func() {
		dctx, cancel := bounded()
		defer cancel()
		_ = c.Client.Delete(dctx, cr)
	}()
	poll := c.Poll
	if poll <= 0 {
		poll = 200 * time.Millisecond
	}
	for {
		if err := c.Client.Get(ctx, client.ObjectKeyFromObject(cr), cr); err != nil {
			return nil, fmt.Errorf("read CertificateRequest %s: %w", cr.Name, err)
		}
		for _, cond := range cr.Status.Conditions {
			switch {
			case cond.Type == cmapi.CertificateRequestConditionDenied && cond.Status == cmmeta.ConditionTrue:
				return nil, fmt.Errorf("CertificateRequest %s denied: %s", cr.Name, cond.Message)
			case cond.Type == cmapi.CertificateRequestConditionInvalidRequest && cond.Status == cmmeta.ConditionTrue:
				return nil, fmt.Errorf("CertificateRequest %s invalid: %s", cr.Name, cond.Message)
			case cond.Type == cmapi.CertificateRequestConditionReady && cond.Reason == cmapi.CertificateRequestReasonFailed:
				return nil, fmt.Errorf("CertificateRequest %s failed: %s", cr.Name, cond.Message)
			case cond.Type == cmapi.CertificateRequestConditionReady && cond.Status == cmmeta.ConditionTrue:
				if len(cr.Status.Certificate) == 0 {
					return nil, fmt.Errorf("CertificateRequest %s is ready without a certificate", cr.Name)
				}
				if len(cr.Status.CA) > 0 {
					c.mu.Lock()
					c.ca = cr.Status.CA
					c.mu.Unlock()
				}
				return cr.Status.Certificate, nil
			}
		}
		select {
		case <-ctx.Done():
			// The caller's deadline (Renewals.Timeout) or its end.
			return nil, fmt.Errorf("CertificateRequest %s/%s for issuer %s %s was not approved and issued: %w (is an approver running: cert-manager's own, or approver-policy with a policy for this issuer?); the request is deleted and retried",
				c.Namespace, cr.Name, cmp.Or(c.IssuerRef.Kind, "Issuer"), c.IssuerRef.Name, context.Cause(ctx))
		case <-c.Clock.After(poll):
		}
	}
}

// ErrNoBundleYet means no request has been issued yet, so the issuer's CA
// is not known.
var ErrNoBundleYet = errors.New("cert-manager issuer's CA not known until a first certificate is issued")

// BundlePEM implements Backend: the CA the issuer reported last.
func (c *CertManager) BundlePEM(context.Context) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.ca) == 0 {
		return nil, ErrNoBundleYet
	}
	return c.ca, nil
}
