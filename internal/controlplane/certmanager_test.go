package controlplane_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

// playIssuer does what cert-manager's approver and a CA issuer would do
// (cert-manager's controller cannot run here): it approves every
// CertificateRequest in ns for issuerName, signs its CSR with issuer and
// sets the certificate, the CA and Ready. It stops with ctx.
func playIssuer(ctx context.Context, t *testing.T, ns, issuerName string, issuer *ca.Authority) {
	for ctx.Err() == nil {
		var crs cmapi.CertificateRequestList
		if err := env.Client.List(ctx, &crs, client.InNamespace(ns)); err != nil {
			return
		}
		for i := range crs.Items {
			cr := &crs.Items[i]
			if cr.Spec.IssuerRef.Name != issuerName || len(cr.Status.Certificate) > 0 {
				continue
			}
			block, _ := pem.Decode(cr.Spec.Request)
			id, err := spiffeid.FromString(cr.Annotations["trellis.dev/spiffe-id"])
			if block == nil || err != nil {
				continue
			}
			chain, err := issuer.Sign(ctx, block.Bytes, id, cr.Spec.Duration.Duration)
			now := metav1.Now()
			cr.Status.Conditions = []cmapi.CertificateRequestCondition{{Type: cmapi.CertificateRequestConditionApproved, Status: cmmeta.ConditionTrue, Reason: "cert-manager.io", LastTransitionTime: &now}}
			if err != nil {
				cr.Status.Conditions = append(cr.Status.Conditions, cmapi.CertificateRequestCondition{Type: cmapi.CertificateRequestConditionReady, Status: cmmeta.ConditionFalse, Reason: cmapi.CertificateRequestReasonFailed, Message: err.Error(), LastTransitionTime: &now})
			} else {
				cr.Status.Certificate, cr.Status.CA = chain, issuer.RootPEM()
				cr.Status.Conditions = append(cr.Status.Conditions, cmapi.CertificateRequestCondition{Type: cmapi.CertificateRequestConditionReady, Status: cmmeta.ConditionTrue, Reason: cmapi.CertificateRequestReasonIssued, LastTransitionTime: &now})
			}
			_ = env.Client.Status().Update(ctx, cr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

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
	go playIssuer(ctx, t, "trellis-system", "mesh-ca", issuer)

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
