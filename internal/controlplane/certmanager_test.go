package controlplane_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/testgen"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

// TestCertManagerIssuesWorkloadCertificates switches MeshConfig to a
// cert-manager ClusterIssuer: proxies then get SVIDs signed by that issuer
// through CertificateRequests (carrying only CSRs), with its CA as trust
// bundle, and the requests are cleaned up.
func TestCertManagerIssuesWorkloadCertificates(t *testing.T) {
	p := startPlane(t, nil)
	issuer, err := ca.NewSelfSigned("cluster.local", time.Hour, clockReal{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go testgen.PlayCertManagerIssuer(ctx, env.Client, "trellis-system", "mesh-ca", issuer)

	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}, Spec: meshv1alpha1.MeshConfigSpec{
		Issuer: meshv1alpha1.Issuer{Type: meshv1alpha1.IssuerCertManager, CertManager: &meshv1alpha1.CertManagerIssuer{IssuerRef: meshv1alpha1.IssuerReference{Name: "mesh-ca", Kind: "ClusterIssuer"}}},
	}}
	create(t, mc)
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), mc) })
	deadline := time.Now().Add(wait)
	for p.Pusher.Mesh() == nil || p.Pusher.Mesh().Config.Issuer.Type != meshv1alpha1.IssuerCertManager {
		if time.Now().After(deadline) {
			t.Fatal("the MeshConfig did not reach the model")
		}
		time.Sleep(20 * time.Millisecond)
	}
	w := newWorld(t, 95)
	c := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	if err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.SecretType]["default"] != nil && res[resource.SecretType]["ROOTCA"] != nil
	}); err != nil {
		t.Fatal(err)
	}
	res, _ := c.Snapshot()
	sec := res[resource.SecretType]["default"].(*tlsv3.Secret)
	block, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: rootPool(issuer), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("the SVID is not signed by the cert-manager issuer: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: rootPool(p.Authority)}); err == nil {
		t.Error("the SVID verifies against the built-in root: cert-manager was not used")
	}
	want := "spiffe://cluster.local/ns/" + w.ns + "/sa/frontend"
	if len(cert.URIs) != 1 || cert.URIs[0].String() != want {
		t.Errorf("SVID URIs %v", cert.URIs)
	}
	bundle := res[resource.SecretType]["ROOTCA"].(*tlsv3.Secret).GetValidationContext().GetTrustedCa().GetInlineBytes()
	if string(bundle) != string(issuer.RootPEM()) {
		t.Error("the trust bundle is not the issuer's CA")
	}
	deadline = time.Now().Add(wait)
	for {
		var crs cmapi.CertificateRequestList
		if err := env.Client.List(context.Background(), &crs, client.InNamespace("trellis-system")); err != nil {
			t.Fatal(err)
		}
		if len(crs.Items) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d CertificateRequests left behind", len(crs.Items))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
