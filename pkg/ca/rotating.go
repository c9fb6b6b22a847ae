package ca

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Rotating is the built-in backend during and outside root rotation: one
// authority signs, and the trust bundle holds every root still trusted.
type Rotating struct {
	mu      sync.RWMutex
	signer  *Authority
	trusted []*Authority
}

// NewRotating starts with a single root.
func NewRotating(a *Authority) *Rotating { return &Rotating{signer: a, trusted: []*Authority{a}} }

// Set changes the signer and the trusted roots; it reports whether anything changed.
func (r *Rotating) Set(signer *Authority, trusted ...*Authority) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	same := r.signer.Root().Equal(signer.Root()) && len(trusted) == len(r.trusted)
	for i := 0; same && i < len(trusted); i++ {
		same = trusted[i].Root().Equal(r.trusted[i].Root())
	}
	r.signer, r.trusted = signer, trusted
	return !same
}

// Signer is the authority that signs now.
func (r *Rotating) Signer() *Authority {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.signer
}

// Sign implements Backend with the current signer.
func (r *Rotating) Sign(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]byte, error) {
	return r.Signer().Sign(ctx, csrDER, id, ttl)
}

// BundlePEM implements Backend: every trusted root, as a SPIFFE X.509
// bundle (go-spiffe) marshalled to PEM.
func (r *Rotating) BundlePEM(context.Context) ([]byte, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	b := x509bundle.New(spiffeid.RequireTrustDomainFromString("trellis.bundle"))
	for _, a := range r.trusted {
		b.AddX509Authority(a.Root())
	}
	return b.Marshal()
}

// Fingerprint is the SHA-256 of a root certificate, hex.
func Fingerprint(a *Authority) string {
	sum := sha256.Sum256(a.Root().Raw)
	return hex.EncodeToString(sum[:])
}
