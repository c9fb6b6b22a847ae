package controlplane

import (
	"context"
	"sync"
	"time"

	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// meshBackend signs with the backend MeshConfig's issuer selects at the
// time of each request: the built-in CA, or cert-manager with the
// configured issuerRef.
type meshBackend struct {
	builtIn   ca.Backend
	client    client.Client
	namespace string
	clock     clock.Clock
	mesh      func() model.Mesh

	mu          sync.Mutex
	certManager map[cmmeta.IssuerReference]*ca.CertManager
}

func (b *meshBackend) current() ca.Backend {
	iss := b.mesh().Config.Issuer
	if iss.Type != meshv1alpha1.IssuerCertManager || iss.CertManager == nil {
		return b.builtIn
	}
	ref := cmmeta.IssuerReference{Name: iss.CertManager.IssuerRef.Name, Kind: iss.CertManager.IssuerRef.Kind, Group: iss.CertManager.IssuerRef.Group}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.certManager == nil {
		b.certManager = map[cmmeta.IssuerReference]*ca.CertManager{}
	}
	cm, ok := b.certManager[ref]
	if !ok {
		cm = &ca.CertManager{Client: b.client, Namespace: b.namespace, IssuerRef: ref, Clock: b.clock}
		b.certManager[ref] = cm
	}
	return cm
}

func (b *meshBackend) Sign(ctx context.Context, csrDER []byte, id spiffeid.ID, ttl time.Duration) ([]byte, error) {
	return b.current().Sign(ctx, csrDER, id, ttl)
}

func (b *meshBackend) BundlePEM(ctx context.Context) ([]byte, error) {
	return b.current().BundlePEM(ctx)
}
