package controller

import (
	"bytes"
	"context"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	"k8s.io/client-go/util/retry"
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

// Sync writes the bundle into every webhook of both configurations.
func (w *WebhookBundle) Sync(ctx context.Context) error {
	bundle, err := w.Bundle(ctx)
	if err != nil {
		return err
	}
	err = syncBundle(ctx, w.Client, w.Name, bundle, func() *admissionv1.MutatingWebhookConfiguration { return &admissionv1.MutatingWebhookConfiguration{} },
		func(c *admissionv1.MutatingWebhookConfiguration) (out []*[]byte) {
			for i := range c.Webhooks {
				out = append(out, &c.Webhooks[i].ClientConfig.CABundle)
			}
			return out
		})
	if err != nil || w.ValidatingName == "" {
		return err
	}
	return syncBundle(ctx, w.Client, w.ValidatingName, bundle, func() *admissionv1.ValidatingWebhookConfiguration {
		return &admissionv1.ValidatingWebhookConfiguration{}
	},
		func(c *admissionv1.ValidatingWebhookConfiguration) (out []*[]byte) {
			for i := range c.Webhooks {
				out = append(out, &c.Webhooks[i].ClientConfig.CABundle)
			}
			return out
		})
}

// syncBundle writes bundle into the caBundles of the named configuration.
// A conflict (another writer got there first: a chart upgrade, a former
// leader) is no error: the configuration is read again and the write
// retried. A configuration not installed (yet) is no error either.
func syncBundle[T client.Object](ctx context.Context, c client.Client, name string, bundle []byte, newObj func() T, caBundles func(T) []*[]byte) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		obj := newObj()
		if err := c.Get(ctx, client.ObjectKey{Name: name}, obj); err != nil {
			return client.IgnoreNotFound(err)
		}
		changed := false
		for _, b := range caBundles(obj) {
			if !bytes.Equal(*b, bundle) {
				*b, changed = bundle, true
			}
		}
		if !changed {
			return nil
		}
		return c.Update(ctx, obj)
	})
}
