package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// conditions computes Accepted, ResolvedRefs and Programmed from the
// problems found for one object (or one route parent).
func conditions(problems []model.Problem, generation int64) []metav1.Condition {
	cond := func(t string, ok bool, okReason, okMsg string, bad []model.Problem) metav1.Condition {
		c := metav1.Condition{Type: t, ObservedGeneration: generation, Status: metav1.ConditionTrue, Reason: okReason, Message: okMsg}
		if !ok {
			c.Status, c.Reason = metav1.ConditionFalse, bad[0].Reason
			msgs := make([]string, 0, len(bad))
			for _, p := range bad {
				if p.Field != "" {
					msgs = append(msgs, p.Field+": "+p.Message)
				} else {
					msgs = append(msgs, p.Message)
				}
			}
			c.Message = truncate(strings.Join(msgs, "; "), 32000)
		}
		return c
	}
	var accepted, refs, rejected []model.Problem
	for _, p := range problems {
		switch p.Condition {
		case meshv1alpha1.ConditionResolvedRefs:
			refs = append(refs, p)
		case meshv1alpha1.ConditionProgrammed:
			rejected = append(rejected, p)
		default:
			accepted = append(accepted, p)
		}
	}
	a := cond(meshv1alpha1.ConditionAccepted, len(accepted) == 0, meshv1alpha1.ReasonAccepted, "Accepted", accepted)
	r := cond(meshv1alpha1.ConditionResolvedRefs, len(refs) == 0, meshv1alpha1.ReasonResolvedRefs, "All references resolved", refs)
	p := metav1.Condition{Type: meshv1alpha1.ConditionProgrammed, ObservedGeneration: generation, Status: metav1.ConditionTrue,
		Reason: meshv1alpha1.ReasonProgrammed, Message: "Configuration computed and handed to the xDS server"}
	switch {
	case a.Status != metav1.ConditionTrue:
		p.Status, p.Reason, p.Message = metav1.ConditionFalse, meshv1alpha1.ReasonInvalid, "Not programmed: see the Accepted condition"
	case len(rejected) > 0:
		p = cond(meshv1alpha1.ConditionProgrammed, false, "", "", rejected)
		p.ObservedGeneration = generation
	}
	return []metav1.Condition{a, r, p}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

// setConditions merges want into have, keeping lastTransitionTime of
// conditions whose status did not change; it reports whether anything changed.
func setConditions(have *[]metav1.Condition, want []metav1.Condition) bool {
	before := slices.Clone(*have)
	for _, c := range want {
		meta.SetStatusCondition(have, c)
	}
	return !apiequality.Semantic.DeepEqual(before, *have)
}

func problemsFor(problems []model.Problem, kind, ns, name string) []model.Problem {
	var out []model.Problem
	for _, p := range problems {
		if p.Object.Kind == kind && p.Object.Namespace == ns && p.Object.Name == name {
			out = append(out, p)
		}
	}
	return out
}

// writeStatus updates the status of every Trellis object and the parent
// statuses of every route, only where something changed. A conflict means a
// newer object is on its way and the resulting event reconciles again.
func (r *MeshReconciler) writeStatus(ctx context.Context, in model.Input, problems []model.Problem) error {
	r.logProblems(ctx, problems)
	var errs []error
	update := func(obj client.Object) {
		if err := r.Client.Status().Update(ctx, obj); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("update status of %T %s/%s: %w", obj, obj.GetNamespace(), obj.GetName(), err))
		}
	}
	policy := func(obj client.Object, kind string, st *meshv1alpha1.Status, changed bool) {
		ps := problemsFor(problems, kind, obj.GetNamespace(), obj.GetName())
		changed = setConditions(&st.Conditions, conditions(ps, obj.GetGeneration())) || changed
		if st.ObservedGeneration != obj.GetGeneration() {
			st.ObservedGeneration, changed = obj.GetGeneration(), true
		}
		if changed {
			update(obj)
		}
	}
	if mc := in.MeshConfig; mc != nil {
		td := r.trustDomain != "" && mc.Status.TrustDomain != r.trustDomain
		if td {
			mc.Status.TrustDomain = r.trustDomain
		}
		policy(mc, "MeshConfig", &mc.Status.Status, td)
	}
	for _, o := range in.AccessPolicies {
		policy(o, "AccessPolicy", &o.Status.Status, false)
	}
	for _, o := range in.BackendPolicies {
		policy(o, "BackendPolicy", &o.Status.Status, false)
	}
	for _, o := range in.ExternalServices {
		policy(o, "ExternalService", &o.Status.Status, false)
	}
	for _, o := range in.HTTPRoutes {
		if routeStatus(&o.Status.RouteStatus, o.Spec.ParentRefs, o.Namespace, o.Generation, problemsFor(problems, "HTTPRoute", o.Namespace, o.Name)) {
			update(o)
		}
	}
	for _, o := range in.GRPCRoutes {
		if routeStatus(&o.Status.RouteStatus, o.Spec.ParentRefs, o.Namespace, o.Generation, problemsFor(problems, "GRPCRoute", o.Namespace, o.Name)) {
			update(o)
		}
	}
	return errors.Join(errs...)
}

// logProblems logs each problem once, at info, when it first appears
// (not every round): the object, the field, the reason and the message,
// also for what has no status of ours to carry it (a pod's annotation).
func (r *MeshReconciler) logProblems(ctx context.Context, problems []model.Problem) {
	seen := map[string]bool{}
	log := logf.FromContext(ctx)
	for _, p := range problems {
		key := p.String()
		seen[key] = true
		if r.loggedProblems[key] {
			continue
		}
		msg := "object cannot be programmed as written"
		switch p.Condition {
		case meshv1alpha1.ConditionResolvedRefs:
			msg = "object refers to something that does not exist"
		case meshv1alpha1.ConditionProgrammed:
			msg = "proxies reject configuration from this object"
		}
		log.Info(msg, "object", p.Object.String(), "field", p.Field, "reason", p.Reason, "problem", p.Message)
	}
	r.loggedProblems = seen
}

// routeStatus sets one RouteParentStatus per Service parent (GAMMA),
// leaving entries of other controllers alone. Problems on a parentRef apply
// to that parent; problems on rules apply to every parent.
func routeStatus(st *gwv1.RouteStatus, parents []gwv1.ParentReference, routeNS string, generation int64, problems []model.Problem) bool {
	changed := false
	var keep []gwv1.RouteParentStatus
	for _, ps := range st.Parents {
		if ps.ControllerName != ControllerName {
			keep = append(keep, ps)
		}
	}
	var ours []gwv1.RouteParentStatus
	for i, pr := range parents {
		if !(pr.Group == nil || *pr.Group == "" || *pr.Group == "core") || !(pr.Kind == nil || *pr.Kind == "Service") {
			continue
		}
		field := fmt.Sprintf("spec.parentRefs[%d]", i)
		var mine []model.Problem
		for _, p := range problems {
			if !strings.HasPrefix(p.Field, "spec.parentRefs[") || p.Field == field || strings.HasPrefix(p.Field, field+".") {
				mine = append(mine, p)
			}
		}
		var prev []metav1.Condition
		for _, old := range st.Parents {
			if old.ControllerName == ControllerName && apiequality.Semantic.DeepEqual(old.ParentRef, pr) {
				prev = slices.Clone(old.Conditions)
			}
		}
		conds := prev
		all := conditions(mine, generation)
		setConditions(&conds, all[:2]) // GAMMA: Accepted and ResolvedRefs
		// Programmed only while proxies reject the route's configuration
		// (Gateway API defines no Programmed for mesh routes).
		if all[2].Reason == meshv1alpha1.ReasonRejectedByProxy {
			setConditions(&conds, all[2:])
		} else {
			meta.RemoveStatusCondition(&conds, meshv1alpha1.ConditionProgrammed)
		}
		ours = append(ours, gwv1.RouteParentStatus{ParentRef: pr, ControllerName: ControllerName, Conditions: conds})
	}
	next := append(keep, ours...)
	if !apiequality.Semantic.DeepEqual(st.Parents, next) {
		st.Parents, changed = next, true
	}
	return changed
}
