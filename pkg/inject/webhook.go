package inject

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

// WebhookPath is where the injection webhook is served.
const WebhookPath = "/inject"

// +kubebuilder:webhook:path=/inject,mutating=true,failurePolicy=fail,sideEffects=None,groups="",resources=pods,verbs=create,versions=v1,name=inject.trellis.dev,admissionReviewVersions=v1,reinvocationPolicy=IfNeeded

// Webhook is the mutating admission webhook around Pod. The
// MutatingWebhookConfiguration selects namespaces labelled
// trellis.dev/inject=enabled (and never the control plane's namespace or
// kube-system); everything else is decided by Pod.
type Webhook struct {
	Decoder admission.Decoder
	// Config returns the injection settings (MeshConfig changes apply to
	// pods created after them).
	Config func() Config
}

// Handle implements admission.Handler.
func (w *Webhook) Handle(ctx context.Context, req admission.Request) admission.Response {
	// The decoder reads YAML too, but the patch is computed against the
	// JSON the apiserver sends: anything else is a bad request, not a 500
	// (found by FuzzWebhook).
	if !json.Valid(req.Object.Raw) {
		return admission.Errored(http.StatusBadRequest, errors.New("the pod is not a JSON object"))
	}
	var pod corev1.Pod
	if err := w.Decoder.Decode(req, &pod); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if pod.Namespace == "" {
		pod.Namespace = req.Namespace
	}
	injected, warnings := Pod(&pod, w.Config())
	raw, err := json.Marshal(injected)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	log.FromContext(ctx).V(2).Info("injected", "namespace", pod.Namespace, "pod", pod.Name, "generateName", pod.GenerateName, "warnings", len(warnings))
	resp := admission.PatchResponseFromRaw(req.Object.Raw, raw)
	resp.Warnings = warnings
	return resp
}
