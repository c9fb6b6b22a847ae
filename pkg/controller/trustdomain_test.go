package controller

import (
	"context"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// TestTrustDomainChangeIsRefused: MeshConfig deleted and re-created with
// another trustDomain (which the immutability rule cannot see) does not
// change the trust domain the mesh's certificates and SAN checks use; the
// new MeshConfig says so (Accepted=False TrustDomainChangeRefused) and the
// rest of it applies.
func TestTrustDomainChangeIsRefused(t *testing.T) {
	ctx := context.Background()
	del := func() {
		_ = env.Client.Delete(ctx, &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}})
	}
	del()
	t.Cleanup(del)
	p := &recordingPusher{}
	r := &MeshReconciler{Client: env.Client, Pusher: p, IsLeader: func() bool { return true }}
	reconcile := func() {
		t.Helper()
		if _, err := r.Reconcile(ctx, meshKey); err != nil {
			t.Fatal(err)
		}
	}
	create(t, &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}, Spec: meshv1alpha1.MeshConfigSpec{TrustDomain: "cluster.local"}})
	reconcile()
	if td := p.last().Config.TrustDomain; td != "cluster.local" {
		t.Fatalf("trust domain %q", td)
	}

	del()
	reconcile() // no MeshConfig for a moment: still cluster.local
	if td := p.last().Config.TrustDomain; td != "cluster.local" {
		t.Errorf("without a MeshConfig the trust domain became %q", td)
	}
	create(t, &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}, Spec: meshv1alpha1.MeshConfigSpec{
		TrustDomain: "example.org", DefaultAccess: meshv1alpha1.DefaultAccessDeny}})
	reconcile()
	m := p.last()
	if m.Config.TrustDomain != "cluster.local" || !m.Settings.DenyByDefault {
		t.Errorf("after re-creating MeshConfig with trustDomain example.org: trust domain %q (want cluster.local kept), deny by default %v (want the rest applied)", m.Config.TrustDomain, m.Settings.DenyByDefault)
	}
	var mc meshv1alpha1.MeshConfig
	if err := env.Client.Get(ctx, client.ObjectKey{Name: meshv1alpha1.MeshConfigName}, &mc); err != nil {
		t.Fatal(err)
	}
	c := meta.FindStatusCondition(mc.Status.Conditions, meshv1alpha1.ConditionAccepted)
	if c == nil || c.Status != metav1.ConditionFalse || c.Reason != meshv1alpha1.ReasonTrustDomainChangeRefused || !strings.Contains(c.Message, "spec.trustDomain") || !strings.Contains(c.Message, `"cluster.local" stays in force`) {
		t.Errorf("MeshConfig Accepted: %+v", c)
	}
	t.Logf("MeshConfig status: %s %s: %s", c.Status, c.Reason, c.Message)
	if mc.Status.TrustDomain != "cluster.local" {
		t.Errorf("MeshConfig status.trustDomain %q, want the one in force, cluster.local", mc.Status.TrustDomain)
	}

	// A restarted controller (no memory) reads the trust domain in force
	// from the status: still refused.
	p2 := &recordingPusher{}
	r2 := &MeshReconciler{Client: env.Client, Pusher: p2, IsLeader: func() bool { return true }}
	if _, err := r2.Reconcile(ctx, meshKey); err != nil {
		t.Fatal(err)
	}
	if td := p2.last().Config.TrustDomain; td != "cluster.local" {
		t.Errorf("after a controller restart the trust domain became %q (want cluster.local kept)", td)
	}
}
