package xds

import (
	"context"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// WorkloadSecrets returns a Pusher.NodeSecrets function that issues each
// connected proxy its own SVID (a fresh key per proxy, generated here and
// sent only on its authenticated stream) and the trust bundle, under the SDS
// names the translator references.
func WorkloadSecrets(authority *ca.Authority, trustDomain func() string, lifetime func() time.Duration) func(context.Context, *Identity) (map[string]*Resource, error) {
	return func(_ context.Context, id *Identity) (map[string]*Resource, error) {
		spiffeID := model.SPIFFEID(trustDomain(), id.NodeID.Namespace, id.ServiceAccount)
		issued, err := authority.IssueWorkload(spiffeID, lifetime())
		if err != nil {
			return nil, err
		}
		cert := &tlsv3.Secret{Name: translate.SecretWorkloadCert, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: issued.CertPEM}},
			PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: issued.KeyPEM}},
		}}}
		bundle := &tlsv3.Secret{Name: translate.SecretTrustBundle, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: authority.RootPEM()}},
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
}
