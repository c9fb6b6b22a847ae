package controller

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

func rootSecret(t *testing.T, ns, name string, a *ca.Authority) *corev1.Secret {
	t.Helper()
	data, err := a.SecretData()
	if err != nil {
		t.Fatal(err)
	}
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Type: corev1.SecretTypeTLS, Data: data}
}

// TestRootRotationPhasesUnderAFakeClock: Step moves a rotation through
// Overlap, Reissue and Complete, each only after Overlap has passed on the
// injected clock, and Sync applies each phase to the signer and the trust
// bundle.
func TestRootRotationPhasesUnderAFakeClock(t *testing.T) {
	ctx := context.Background()
	ns := env.Namespace(t, nil)
	clk := clocktesting.NewFakeClock(time.Now())
	cur, err := ca.NewSelfSigned("cluster.local", 24*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	next, err := ca.NewSelfSigned("cluster.local", 48*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	create(t, rootSecret(t, ns, ca.RootSecretName, cur), rootSecret(t, ns, NextRootSecretName, next))
	t.Cleanup(func() {
		_ = env.Client.Delete(context.Background(), &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}})
	})
	backend := ca.NewRotating(cur)
	changes := 0
	r := &RootRotation{Client: env.Client, Namespace: ns, Backend: backend, Clock: clk, Overlap: time.Hour, Current: cur, OnChange: func() { changes++ }}

	phase := func() meshv1alpha1.RootRotationPhase {
		t.Helper()
		var mc meshv1alpha1.MeshConfig
		if err := env.Client.Get(ctx, client.ObjectKey{Name: meshv1alpha1.MeshConfigName}, &mc); err != nil {
			t.Fatal(err)
		}
		if mc.Status.RootRotation == nil || mc.Status.RootRotation.To != ca.Fingerprint(next) {
			t.Fatalf("MeshConfig status %+v does not record the rotation to %s", mc.Status.RootRotation, ca.Fingerprint(next))
		}
		return mc.Status.RootRotation.Phase
	}
	step := func(want meshv1alpha1.RootRotationPhase) {
		t.Helper()
		if err := r.Step(ctx); err != nil {
			t.Fatalf("Step: %v", err)
		}
		if got := phase(); got != want {
			t.Fatalf("phase %s; want %s", got, want)
		}
		if err := r.Sync(ctx); err != nil {
			t.Fatalf("Sync: %v", err)
		}
	}

	step(meshv1alpha1.RootOverlap)
	if !backend.Signer().Root().Equal(cur.Root()) || changes != 1 {
		t.Errorf("Overlap: the old root must still sign and the bundle change once (changes %d)", changes)
	}
	clk.Step(59 * time.Minute)
	step(meshv1alpha1.RootOverlap) // not yet: Overlap has not passed
	clk.Step(time.Minute)
	step(meshv1alpha1.RootReissue)
	if !backend.Signer().Root().Equal(next.Root()) || changes != 2 {
		t.Errorf("Reissue: the new root must sign (changes %d)", changes)
	}
	clk.Step(time.Hour)
	step(meshv1alpha1.RootComplete)
	var s corev1.Secret
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: ca.RootSecretName}, &s); err != nil {
		t.Fatal(err)
	}
	if got, err := ca.LoadSecret(s.Data, clk); err != nil || !got.Root().Equal(next.Root()) {
		t.Errorf("after Complete %s holds another root (err %v)", ca.RootSecretName, err)
	}
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: NextRootSecretName}, &s); !apierrors.IsNotFound(err) {
		t.Errorf("%s still exists after Complete (err %v)", NextRootSecretName, err)
	}
	if !backend.Signer().Root().Equal(next.Root()) {
		t.Error("after Complete the new root must sign")
	}
}
