package model

import (
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// The CRDs' +kubebuilder:default values, for objects that did not pass
// through an apiserver (goldens, trellisctl analyze on manifests): Build
// applies them, so the model is what the cluster would store.
// TestDefaultsAreTheCRDs (pkg/apis/mesh/v1alpha1) compares each function
// with what a real apiserver stores for the same object, field by field,
// so the two cannot drift.
//
// One default cannot be applied here: Retries.Attempts (default 2) has no
// omitempty, so a decoded 0 may be an explicit "no retries"; the apiserver
// applies it.

// BackendPolicyDefaults returns spec with every unset defaulted field set.
// spec is not modified.
func BackendPolicyDefaults(spec meshv1alpha1.BackendPolicySpec) meshv1alpha1.BackendPolicySpec {
	out := *spec.DeepCopy()
	if r := out.Retries; r != nil && len(r.RetryOn) == 0 {
		r.RetryOn = []meshv1alpha1.RetryOn{"connect-failure", "refused-stream", "unavailable", "cancelled", "5xx"}
	}
	if o := out.OutlierDetection; o != nil {
		if o.Consecutive5xxErrors == 0 {
			o.Consecutive5xxErrors = 5
		}
		if o.Interval == "" {
			o.Interval = "10s"
		}
		if o.BaseEjectionTime == "" {
			o.BaseEjectionTime = "30s"
		}
		if o.MaxEjectionPercent == 0 {
			o.MaxEjectionPercent = 50
		}
	}
	if lb := out.LoadBalancer; lb != nil && lb.Algorithm == "" {
		lb.Algorithm = meshv1alpha1.LoadBalancingAlgorithm("RoundRobin")
	}
	if rl := out.RateLimit; rl != nil && rl.Interval == "" {
		rl.Interval = "1s"
	}
	targetRefDefaults(out.TargetRefs)
	return out
}

// AccessPolicyDefaults returns spec with every unset defaulted field set.
// spec is not modified.
func AccessPolicyDefaults(spec meshv1alpha1.AccessPolicySpec) meshv1alpha1.AccessPolicySpec {
	out := *spec.DeepCopy()
	if out.Action == "" {
		out.Action = meshv1alpha1.AccessAllow
	}
	for i := range out.Rules {
		for _, to := range out.Rules[i].To {
			for j := range to.Paths {
				if to.Paths[j].Type == "" {
					to.Paths[j].Type = meshv1alpha1.PathPrefix
				}
			}
		}
	}
	targetRefDefaults(out.TargetRefs)
	return out
}

func targetRefDefaults(refs []meshv1alpha1.PolicyTargetReference) {
	for i := range refs {
		if refs[i].Kind == "" {
			refs[i].Kind = "Service"
		}
	}
}
