package xds

import (
	"context"
	"math/rand/v2"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// NodeSecrets are the SDS resources of one proxy and when to renew them.
type NodeSecrets struct {
	Resources map[string]*Resource
	Identity  string
	NotAfter  time.Time
	RotateAt  time.Time
}

// WorkloadSecrets returns a Pusher.NodeSecrets function that issues each
// connected proxy its own SVID (a fresh key per proxy, generated in memory
// and sent only on its authenticated stream) and the trust bundle, under the
// SDS names the translator references, and says when to renew it: after
// MeshConfig's rotationPercent of the lifetime plus up to 10 points of jitter.
func WorkloadSecrets(issuer *ca.Issuer, cfg func() model.Mesh) func(context.Context, *Identity) (*NodeSecrets, error) {
	return func(ctx context.Context, id *Identity) (*NodeSecrets, error) {
		mc := cfg().Config
		lifetime, err := time.ParseDuration(string(mc.Certificates.Lifetime))
		if err != nil || lifetime <= 0 {
			lifetime = 24 * time.Hour
		}
		spiffeID := model.SPIFFEID(mc.TrustDomain, id.NodeID.Namespace, id.ServiceAccount)
		issued, err := issuer.Issue(ctx, spiffeID, lifetime)
		if err != nil {
			return nil, err
		}
		bundlePEM, err := issuer.Backend.BundlePEM(ctx)
		if err != nil {
			return nil, err
		}
		out, err := SecretResources(issued, bundlePEM)
		if err != nil {
			return nil, err
		}
		return &NodeSecrets{
			Resources: out, Identity: spiffeID, NotAfter: issued.NotAfter,
			// From the issue time, not the backdated NotBefore (clock-skew allowance).
			RotateAt: ca.RotateAt(issued.NotAfter.Add(-lifetime), issued.NotAfter, mc.Certificates.RotationPercent, rand.Float64()),
		}, nil
	}
}

// SecretResources are the SDS resources of one proxy under the names the
// translator references: its certificate and key, and the trust bundle.
func SecretResources(issued *ca.Issued, bundlePEM []byte) (map[string]*Resource, error) {
	cert := &tlsv3.Secret{Name: translate.SecretWorkloadCert, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: issued.CertPEM}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: issued.KeyPEM}},
	}}}
	bundle := &tlsv3.Secret{Name: translate.SecretTrustBundle, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: bundlePEM}},
	}}}
	out := map[string]*Resource{}
	for _, s := range []*tlsv3.Secret{cert, bundle} {
		r, err := NewResource(s.Name, s)
		if err != nil {
			return nil, err
		}
		out[s.Name] = r
	}
	return out, nil
}
