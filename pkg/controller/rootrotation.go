package controller

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

// NextRootSecretName starts a root rotation when it appears in the control
// plane's namespace: a kubernetes.io/tls Secret holding the new root.
const NextRootSecretName = "trellis-ca-next"

// RootRotation rotates the built-in CA's root with an overlap: Overlap
// (both roots trusted, the old one signs), Reissue (the new one signs and
// every connected workload is re-issued, both trusted), Complete (the new
// root replaces the old in trellis-ca; trellis-ca-next is deleted). Each
// phase lasts at least Overlap. The leader advances the phases (Step) and
// records them in MeshConfig's status; every replica applies them to its
// signer and trust bundle (Sync).
type RootRotation struct {
	// Client reads and writes directly (Secrets are not cached).
	Client    client.Client
	Namespace string
	Backend   *ca.Rotating
	Clock     clock.PassiveClock
	Overlap   time.Duration
	// Recorder, when set, reports a refused rotation and a restored root
	// as Events on the Secrets.
	Recorder record.EventRecorder
	// Current is the root trellis-ca held when last read (set it to the
	// root loaded at start): restored when the Secret is deleted.
	Current *ca.Authority
	// OnChange runs after the signer or the trust bundle changed: re-issue
	// workload and serving certificates, republish the bundle.
	OnChange func()
	// OnRootSecret, when set, is handed the trellis-ca Secret each Sync
	// reads (one read per tick serves both).
	OnRootSecret func(*corev1.Secret)
}

// +kubebuilder:rbac:groups="",namespace=trellis-system,resources=secrets,verbs=get;create;update;delete
// +kubebuilder:rbac:groups=mesh.trellis.dev,resources=meshconfigs,verbs=create

func (r *RootRotation) secretRoot(ctx context.Context, name string) (*ca.Authority, *corev1.Secret, error) {
	var s corev1.Secret
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: name}, &s); err != nil {
		return nil, nil, err
	}
	a, err := ca.LoadSecret(s.Data, r.Clock)
	return a, &s, err
}

func (r *RootRotation) meshConfig(ctx context.Context) (*meshv1alpha1.MeshConfig, error) {
	var mc meshv1alpha1.MeshConfig
	err := r.Client.Get(ctx, client.ObjectKey{Name: meshv1alpha1.MeshConfigName}, &mc)
	return &mc, err
}

// Sync applies the recorded phase to this replica's signer and bundle.
// A trellis-ca Secret that was deleted is restored from memory: minting a
// new root would cut every workload off (nothing would trust it).
func (r *RootRotation) Sync(ctx context.Context) error {
	cur, secret, err := r.secretRoot(ctx, ca.RootSecretName)
	if secret != nil && r.OnRootSecret != nil {
		r.OnRootSecret(secret)
	}
	if apierrors.IsNotFound(err) && r.Current != nil {
		if cur, err = r.restore(ctx); err != nil {
			return err
		}
	}
	if err != nil {
		return err
	}
	r.Current = cur
	signer, trusted := cur, []*ca.Authority{cur}
	next, _, err := r.secretRoot(ctx, NextRootSecretName)
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	if next != nil {
		if mc, err := r.meshConfig(ctx); err == nil && mc.Status.RootRotation != nil && mc.Status.RootRotation.To == ca.Fingerprint(next) {
			switch mc.Status.RootRotation.Phase {
			case meshv1alpha1.RootOverlap:
				trusted = []*ca.Authority{cur, next}
			case meshv1alpha1.RootReissue:
				signer, trusted = next, []*ca.Authority{cur, next}
			}
		}
	}
	if r.Backend.Set(signer, trusted...) && r.OnChange != nil {
		r.OnChange()
	}
	return nil
}

// restore recreates trellis-ca from the root this replica holds.
func (r *RootRotation) restore(ctx context.Context) (*ca.Authority, error) {
	data, err := r.Current.SecretData()
	if err != nil {
		return nil, err
	}
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: r.Namespace, Name: ca.RootSecretName, Labels: map[string]string{"app.kubernetes.io/managed-by": "trellis"}},
		Type:       corev1.SecretTypeTLS,
		Data:       data,
	}
	if err := r.Client.Create(ctx, s); err != nil {
		if apierrors.IsAlreadyExists(err) { // another replica restored it first
			cur, _, err := r.secretRoot(ctx, ca.RootSecretName)
			return cur, err
		}
		return nil, fmt.Errorf("restore the deleted secret %s: %w", ca.RootSecretName, err)
	}
	msg := fmt.Sprintf("secret %s/%s was deleted; restored it from the root this controller holds (fingerprint %s). Delete it only to replace it through a rotation (trellis-ca-next)", r.Namespace, ca.RootSecretName, ca.Fingerprint(r.Current))
	log.FromContext(ctx).Info(msg)
	if r.Recorder != nil {
		r.Recorder.Event(s, corev1.EventTypeWarning, "CARootRestored", msg)
	}
	return r.Current, nil
}

// Step advances a rotation in progress (leader only).
func (r *RootRotation) Step(ctx context.Context) error {
	logger := log.FromContext(ctx)
	next, nextSecret, err := r.secretRoot(ctx, NextRootSecretName)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	cur, curSecret, err := r.secretRoot(ctx, ca.RootSecretName)
	if err != nil {
		return err
	}
	mc, err := r.meshConfig(ctx)
	if apierrors.IsNotFound(err) {
		mc = &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}}
		if err := r.Client.Create(ctx, mc); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	now := r.Clock.Now()
	rr := mc.Status.RootRotation
	to := ca.Fingerprint(next)
	set := func(p meshv1alpha1.RootRotationPhase) error {
		mc.Status.RootRotation = &meshv1alpha1.RootRotationStatus{Phase: p, Since: metav1.NewTime(now), From: ca.Fingerprint(cur), To: to}
		if rr != nil && rr.To == to {
			mc.Status.RootRotation.From = rr.From // the same rotation, advancing
		}
		logger.Info("root rotation", "phase", p, "to", to)
		return r.Client.Status().Update(ctx, mc)
	}
	switch {
	case rr == nil || rr.To != to:
		if ca.SameSubject(cur, next) {
			err := fmt.Errorf("secret %s: the new root's subject %q is the current root's; sidecars could not verify the control plane after the rotation. Create it with another subject (e.g. a year or generation in its CN); the rotation does not start", NextRootSecretName, next.Root().Subject)
			if r.Recorder != nil {
				r.Recorder.Event(nextSecret, corev1.EventTypeWarning, "RootRotationRefused", err.Error())
			}
			return err
		}
		return set(meshv1alpha1.RootOverlap)
	case rr.Phase == meshv1alpha1.RootOverlap && now.Sub(rr.Since.Time) >= r.Overlap:
		// The new root signs from now on. Envoy reads the roots of its
		// xDS channel once, at start: sidecars started before the
		// rotation trust only the old root and would fail every
		// reconnection to a control plane serving a certificate of the new
		// one. The old root cross-signs the new one; serving certificates
		// carry that link (kept in trellis-ca after completion).
		cross, err := cur.CrossSign(next)
		if err != nil {
			return err
		}
		if nextSecret.Data == nil {
			nextSecret.Data = map[string][]byte{}
		}
		nextSecret.Data[ca.CrossSignedKey] = cross
		if err := r.Client.Update(ctx, nextSecret); err != nil {
			return err
		}
		return set(meshv1alpha1.RootReissue)
	case rr.Phase == meshv1alpha1.RootReissue && now.Sub(rr.Since.Time) >= r.Overlap:
		curSecret.Data = nextSecret.Data
		if err := r.Client.Update(ctx, curSecret); err != nil {
			return err
		}
		if err := r.Client.Delete(ctx, nextSecret); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
		return set(meshv1alpha1.RootComplete)
	}
	return nil
}
