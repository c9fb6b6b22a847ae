package testgen

import (
	"context"
	"encoding/pem"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/pkg/ca"
)

// PlayCertManagerIssuer does what cert-manager's approver and a CA issuer
// would do (cert-manager's controller cannot run in the tests): it approves
// every CertificateRequest in ns for issuerName, signs its CSR with issuer
// and sets the certificate, the CA and Ready. It returns when ctx ends.
func PlayCertManagerIssuer(ctx context.Context, c client.Client, ns, issuerName string, issuer *ca.Authority) {
	for ctx.Err() == nil {
		var crs cmapi.CertificateRequestList
		if err := c.List(ctx, &crs, client.InNamespace(ns)); err != nil {
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
			_ = c.Status().Update(ctx, cr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
