package controller

import (
	"bytes"
	"context"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// WebhookBundle keeps the caBundle of the injection webhook's
// MutatingWebhookConfiguration equal to the mesh trust bundle, so the
// apiserver trusts the serving certificate the control plane issues
// itself, across root rotations. (With cert-manager's CA injector managing
// the bundle instead, it is not used.)
type WebhookBundle struct {
	Client client.Client
	// Name is the MutatingWebhookConfiguration (injection), ValidatingName
	// the ValidatingWebhookConfiguration (Trellis objects).
	Name, ValidatingName string
	Bundle               func(context.Context) ([]byte, error)
}

// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=mutatingwebhookconfigurations,resourceNames=trellis-injection,verbs=get;update
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=validatingwebhookconfigurations,resourceNames=trellis-validation,verbs=get;update

// Sync writes the bundle into every webhook of the configuration.
func (w *WebhookBundle) Sync(ctx context.Context) error {
	bundle, err := w.Bundle(ctx)
	if err != nil {
		return err
	}
	var mwc admissionv1.MutatingWebhookConfiguration
	if err := w.Client.Get(ctx, client.ObjectKey{Name: w.Name}, &mwc); err != nil {
		if !apierrors.IsNotFound(err) {
			return err
		}
		// not installed (yet)
	}
	changed := false
	for i := range mwc.Webhooks {
		if !bytes.Equal(mwc.Webhooks[i].ClientConfig.CABundle, bundle) {
			mwc.Webhooks[i].ClientConfig.CABundle = bundle
			changed = true
		}
	}
	if changed {
		if err := w.Client.Update(ctx, &mwc); err != nil {
			return err
		}
	}
	if w.ValidatingName == "" {
		return nil
	}
	var vwc admissionv1.ValidatingWebhookConfiguration
	if err := w.Client.Get(ctx, client.ObjectKey{Name: w.ValidatingName}, &vwc); err != nil {
		return client.IgnoreNotFound(err)
	}
	changed = false
	for i := range vwc.Webhooks {
		if !bytes.Equal(vwc.Webhooks[i].ClientConfig.CABundle, bundle) {
			vwc.Webhooks[i].ClientConfig.CABundle = bundle
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return w.Client.Update(ctx, &vwc)
}
