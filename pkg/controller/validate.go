package controller

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// ValidatePath is where the validating webhook for Trellis objects is served.
const ValidatePath = "/validate"

// +kubebuilder:webhook:path=/validate,mutating=false,failurePolicy=ignore,sideEffects=None,groups=mesh.trellis.dev,resources=accesspolicies;backendpolicies;externalservices,verbs=create;update,versions=v1alpha1,name=validate.mesh.trellis.dev,admissionReviewVersions=v1
// +kubebuilder:webhook:path=/validate,mutating=false,failurePolicy=ignore,sideEffects=None,groups=gateway.networking.k8s.io,resources=httproutes;grpcroutes,verbs=create;update,versions=v1,name=routes.validate.mesh.trellis.dev,admissionReviewVersions=v1

// Validator rejects what CEL cannot see because it spans objects: a second
// BackendPolicy for a Service, an ExternalService claiming a host and port
// another one has. An AccessPolicy rule that another one's contradicts (the
// same sources and operations allowed by one, denied by the other, on the
// same Service) is admitted with a warning — Deny wins — and so is a target
// Service that does not exist (yet). It fails open: when the controller is down, the schema's own
// validation still applies and status reports conflicts.
type Validator struct {
	Client  client.Reader
	Decoder admission.Decoder
}

// Handle implements admission.Handler.
func (v *Validator) Handle(ctx context.Context, req admission.Request) admission.Response {
	switch req.Kind.Kind {
	case "BackendPolicy":
		var bp meshv1alpha1.BackendPolicy
		if err := v.decode(req, &bp); err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		return v.backendPolicy(ctx, &bp)
	case "AccessPolicy":
		var ap meshv1alpha1.AccessPolicy
		if err := v.decode(req, &ap); err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		return v.accessPolicy(ctx, &ap)
	case "ExternalService":
		var es meshv1alpha1.ExternalService
		if err := v.decode(req, &es); err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		return v.externalService(ctx, &es)
	case "HTTPRoute":
		var r gwv1.HTTPRoute
		if err := v.decode(req, &r); err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		return admission.Allowed("").WithWarnings(parentRefWarnings(r.Spec.ParentRefs)...)
	case "GRPCRoute":
		var r gwv1.GRPCRoute
		if err := v.decode(req, &r); err != nil {
			return admission.Errored(http.StatusBadRequest, err)
		}
		return admission.Allowed("").WithWarnings(parentRefWarnings(r.Spec.ParentRefs)...)
	}
	return admission.Allowed("")
}

// decode decodes the request's object into obj. The object is in the
// request's namespace (the apiserver's, from the URL), whatever its body
// says.
func (v *Validator) decode(req admission.Request, obj client.Object) error {
	if err := v.Decoder.Decode(req, obj); err != nil {
		return err
	}
	if req.Namespace != "" {
		obj.SetNamespace(req.Namespace)
	}
	return nil
}

// parentRefWarnings flags the commonest GAMMA mistake (see
// model.MisgroupedServiceParents). Routes are not Trellis's: it warns and
// admits.
func parentRefWarnings(refs []gwv1.ParentReference) []string {
	var out []string
	for _, i := range model.MisgroupedServiceParents(refs) {
		out = append(out, fmt.Sprintf("spec.parentRefs[%d]: %s", i, model.MisgroupedServiceParentMessage(refs[i])))
	}
	return out
}

// missingTargets warns about target Services that do not exist (yet). A
// name no Service can have is an error naming the field (the schema
// rejects it first on a real apiserver; the webhook must not answer 500).
func (v *Validator) missingTargets(ctx context.Context, ns string, refs []meshv1alpha1.PolicyTargetReference) ([]string, error) {
	var warnings []string
	for i, t := range refs {
		if errs := validation.IsDNS1035Label(t.Name); len(errs) > 0 {
			return nil, invalidField{fmt.Sprintf("spec.targetRefs[%d].name: %q is not a Service name: %s", i, t.Name, strings.Join(errs, "; "))}
		}
		var svc corev1.Service
		err := v.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: t.Name}, &svc)
		if apierrors.IsNotFound(err) {
			warnings = append(warnings, fmt.Sprintf("spec.targetRefs[%d]: Service %s/%s does not exist (yet); the policy applies once it does", i, ns, t.Name))
		} else if err != nil {
			return nil, err
		}
	}
	return warnings, nil
}

// invalidField is a denial (403) naming the field, not a failure (500).
type invalidField struct{ message string }

func (e invalidField) Error() string { return e.message }

// errored answers err: a denial for an invalid field, else 500.
func errored(err error) admission.Response {
	var inv invalidField
	if errors.As(err, &inv) {
		return admission.Denied(inv.message)
	}
	return admission.Errored(http.StatusInternalServerError, err)
}

func (v *Validator) backendPolicy(ctx context.Context, bp *meshv1alpha1.BackendPolicy) admission.Response {
	var others meshv1alpha1.BackendPolicyList
	if err := v.Client.List(ctx, &others, client.InNamespace(bp.Namespace)); err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	for i, t := range bp.Spec.TargetRefs {
		for _, o := range others.Items {
			if o.Name == bp.Name {
				continue
			}
			if slices.ContainsFunc(o.Spec.TargetRefs, func(r meshv1alpha1.PolicyTargetReference) bool { return r.Name == t.Name }) {
				return admission.Denied(fmt.Sprintf("spec.targetRefs[%d]: Service %s already has BackendPolicy %s; only one BackendPolicy applies to a Service", i, t.Name, o.Name))
			}
		}
	}
	warnings, err := v.missingTargets(ctx, bp.Namespace, bp.Spec.TargetRefs)
	if err != nil {
		return errored(err)
	}
	return admission.Allowed("").WithWarnings(warnings...)
}

func (v *Validator) accessPolicy(ctx context.Context, ap *meshv1alpha1.AccessPolicy) admission.Response {
	var others meshv1alpha1.AccessPolicyList
	if err := v.Client.List(ctx, &others, client.InNamespace(ap.Namespace)); err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	action := func(p *meshv1alpha1.AccessPolicy) meshv1alpha1.AccessAction {
		if p.Spec.Action == "" {
			return meshv1alpha1.AccessAllow
		}
		return p.Spec.Action
	}
	var warnings []string
	for _, o := range others.Items {
		if o.Name == ap.Name || action(&o) == action(ap) {
			continue
		}
		shared := slices.ContainsFunc(ap.Spec.TargetRefs, func(t meshv1alpha1.PolicyTargetReference) bool {
			return slices.ContainsFunc(o.Spec.TargetRefs, func(u meshv1alpha1.PolicyTargetReference) bool { return u.Name == t.Name })
		})
		if !shared {
			continue
		}
		for i, r := range ap.Spec.Rules {
			for j, or := range o.Spec.Rules {
				if apiequality.Semantic.DeepEqual(r, or) {
					// Deny wins (as Istio's DENY before ALLOW): legal, but the
					// Allow rule allows nothing for these callers. Say so.
					warnings = append(warnings, fmt.Sprintf("spec.rules[%d] matches the same callers and operations as %s AccessPolicy %s rule %d on a shared target: Deny wins, so these requests are denied", i, action(&o), o.Name, j))
				}
			}
		}
	}
	missing, err := v.missingTargets(ctx, ap.Namespace, ap.Spec.TargetRefs)
	if err != nil {
		return errored(err)
	}
	return admission.Allowed("").WithWarnings(append(warnings, missing...)...)
}

func (v *Validator) externalService(ctx context.Context, es *meshv1alpha1.ExternalService) admission.Response {
	var others meshv1alpha1.ExternalServiceList
	if err := v.Client.List(ctx, &others); err != nil {
		return admission.Errored(http.StatusInternalServerError, err)
	}
	for _, o := range others.Items {
		if o.Namespace == es.Namespace && o.Name == es.Name {
			continue
		}
		for _, p := range es.Spec.Ports {
			if !slices.ContainsFunc(o.Spec.Ports, func(q meshv1alpha1.ExternalPort) bool { return q.Number == p.Number }) {
				continue
			}
			for _, h := range es.Spec.Hosts {
				if slices.Contains(o.Spec.Hosts, h) {
					return admission.Denied(fmt.Sprintf("spec.hosts: %s port %d is already declared by ExternalService %s/%s", h, p.Number, o.Namespace, o.Name))
				}
			}
		}
	}
	return admission.Allowed("")
}
