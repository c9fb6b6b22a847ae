package model

import (
	"cmp"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// Gateway API route condition reasons the model reports.
const (
	ReasonNoMatchingParent = string(gwv1.RouteReasonNoMatchingParent)
	ReasonBackendNotFound  = string(gwv1.RouteReasonBackendNotFound)
	ReasonRefNotPermitted  = string(gwv1.RouteReasonRefNotPermitted)
	ReasonInvalidKind      = string(gwv1.RouteReasonInvalidKind)
	ReasonUnsupportedValue = string(gwv1.RouteReasonUnsupportedValue)
)

// Conditions and reasons of Trellis's own objects, for the translator's
// and the xDS server's problems (they import no API package).
const (
	ConditionAccepted     = meshv1alpha1.ConditionAccepted
	ConditionProgrammed   = meshv1alpha1.ConditionProgrammed
	ReasonConflicted      = meshv1alpha1.ReasonConflicted
	ReasonRejectedByProxy = meshv1alpha1.ReasonRejectedByProxy
)

func isServiceRef(group *gwv1.Group, kind *gwv1.Kind) bool {
	return (group == nil || *group == "" || *group == "core") && (kind == nil || *kind == "Service")
}

func (m *Mesh) attachRoutes(httpRoutes []*gwv1.HTTPRoute, grpcRoutes []*gwv1.GRPCRoute) []Problem {
	var problems []Problem
	var routes []*rawRoute
	for _, r := range httpRoutes {
		routes = append(routes, &rawRoute{kind: "HTTPRoute", namespace: r.Namespace, name: r.Name, created: unixOrZero(r.CreationTimestamp), http: &r.Spec, parents: r.Spec.ParentRefs})
	}
	for _, r := range grpcRoutes {
		routes = append(routes, &rawRoute{kind: "GRPCRoute", namespace: r.Namespace, name: r.Name, created: unixOrZero(r.CreationTimestamp), grpc: &r.Spec, parents: r.Spec.ParentRefs})
	}
	for _, r := range routes {
		invalid := m.validateRoute(r)
		problems = append(problems, invalid...)
		if slices.ContainsFunc(invalid, func(p Problem) bool {
			return p.Reason == ReasonUnsupportedValue && p.Condition == meshv1alpha1.ConditionAccepted && p.Field != "" && isMatchField(p.Field)
		}) {
			continue // a rule that cannot be matched correctly: the route is not programmed
		}
		var rules []RouteRule
		for j, pr := range r.parents {
			if !isServiceRef(pr.Group, pr.Kind) {
				continue // a Gateway parent: not ours
			}
			ns := r.namespace
			if pr.Namespace != nil && *pr.Namespace != "" {
				ns = string(*pr.Namespace)
			}
			svc := m.Service(ns, string(pr.Name))
			field := fmt.Sprintf("spec.parentRefs[%d]", j)
			if svc == nil {
				problems = append(problems, Problem{Object: r.ref(), Field: field, Reason: ReasonNoMatchingParent, Condition: meshv1alpha1.ConditionAccepted,
					Message: fmt.Sprintf("parent Service %s/%s does not exist", ns, pr.Name)})
				continue
			}
			if rules == nil {
				rules = m.resolve(r)
			}
			attached := &Route{Kind: r.kind, Namespace: r.namespace, Name: r.name, Created: r.created, Parent: j, Rules: rules}
			if pr.Port != nil {
				if svc.Port(int32(*pr.Port)) == nil {
					problems = append(problems, Problem{Object: r.ref(), Field: field + ".port", Reason: ReasonNoMatchingParent, Condition: meshv1alpha1.ConditionAccepted,
						Message: fmt.Sprintf("parent Service %s/%s has no port %d", ns, pr.Name, *pr.Port)})
					continue
				}
				attached.Port = int32(*pr.Port)
			}
			if ns == r.namespace {
				svc.ProducerRoutes = append(svc.ProducerRoutes, attached)
			} else {
				svc.ConsumerRoutes[r.namespace] = append(svc.ConsumerRoutes[r.namespace], attached)
			}
		}
	}
	order := func(a, b *Route) int {
		return cmp.Or(cmp.Compare(a.Created, b.Created), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name), cmp.Compare(a.Kind, b.Kind))
	}
	for _, svc := range m.Services {
		slices.SortFunc(svc.ProducerRoutes, order)
		var ps []Problem
		svc.ProducerRoutes, ps = kindConflicts(svc, svc.ProducerRoutes)
		problems = append(problems, ps...)
		svc.ProducerRoutes, ps = shadowedRoutes(svc, svc.ProducerRoutes)
		problems = append(problems, ps...)
		for ns := range svc.ConsumerRoutes {
			slices.SortFunc(svc.ConsumerRoutes[ns], order)
			svc.ConsumerRoutes[ns], ps = kindConflicts(svc, svc.ConsumerRoutes[ns])
			problems = append(problems, ps...)
			svc.ConsumerRoutes[ns], ps = shadowedRoutes(svc, svc.ConsumerRoutes[ns])
			problems = append(problems, ps...)
		}
	}
	return problems
}

// unixOrZero is t in Unix seconds, 0 for an unset time (objects that did
// not pass through an apiserver): they sort first either way.
func unixOrZero(t metav1.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

// kindConflicts applies Gateway API's rule for an HTTPRoute and a GRPCRoute
// on one parent (a Service port here, as a Listener for a Gateway): exactly
// one is accepted — the oldest, then the first by namespace/name (routes
// come sorted so) — and the other gets Accepted=False naming the winner.
// Routes of one kind merge as usual.
func kindConflicts(svc *Service, routes []*Route) ([]*Route, []Problem) {
	var kept []*Route
	var problems []Problem
	for _, r := range routes {
		var winner *Route
		for _, k := range kept {
			if k.Kind != r.Kind && (k.Port == 0 || r.Port == 0 || k.Port == r.Port) {
				winner = k
				break
			}
		}
		if winner == nil {
			kept = append(kept, r)
			continue
		}
		on := "Service " + svc.Namespace + "/" + svc.Name
		if p := cmp.Or(r.Port, winner.Port); p != 0 {
			on += fmt.Sprintf(" port %d", p)
		}
		problems = append(problems, Problem{Object: r.Ref(), Field: fmt.Sprintf("spec.parentRefs[%d]", r.Parent), Reason: meshv1alpha1.ReasonConflicted, Condition: meshv1alpha1.ConditionAccepted,
			Message: fmt.Sprintf("%s %s/%s is attached to %s already; Gateway API accepts only one of an HTTPRoute and a GRPCRoute on a parent (the older): move one to another port or Service, or merge them", winner.Kind, winner.Namespace, winner.Name, on)})
	}
	return kept, problems
}

// shadowedRoutes finds routes every match of which an older route on the
// same parent has already (Gateway API: among equal matches the oldest
// route wins): such a route would receive no request, e.g. a second
// catch-all. It gets Accepted=False naming the winner and is not attached
// (traffic is the same either way; it takes over once the winner goes).
// Routes come sorted oldest first.
func shadowedRoutes(svc *Service, routes []*Route) ([]*Route, []Problem) {
	var kept []*Route
	var problems []Problem
	type claim struct {
		port  int32
		route *Route
	}
	claims := map[string][]claim{}
	for _, r := range routes {
		var winner *Route
		shadowed := len(r.Rules) > 0
		var keys []string
		for _, rule := range r.Rules {
			for _, mt := range rule.Matches {
				key := matchKey(mt)
				keys = append(keys, key)
				var by *Route
				for _, c := range claims[key] {
					if c.port == 0 || c.port == r.Port {
						by = c.route
						break
					}
				}
				if by == nil {
					shadowed = false
				} else if winner == nil {
					winner = by
				}
			}
		}
		if !shadowed || winner == nil {
			kept = append(kept, r)
			for _, k := range keys {
				claims[k] = append(claims[k], claim{r.Port, r})
			}
			continue
		}
		on := "Service " + svc.Namespace + "/" + svc.Name
		if r.Port != 0 {
			on += fmt.Sprintf(" port %d", r.Port)
		}
		problems = append(problems, Problem{Object: r.Ref(), Field: fmt.Sprintf("spec.parentRefs[%d]", r.Parent), Reason: meshv1alpha1.ReasonConflicted, Condition: meshv1alpha1.ConditionAccepted,
			Message: fmt.Sprintf("every match of this route is already a match of the older %s %s/%s on %s, which wins (Gateway API: the oldest route among equal matches), so this route would receive no request; make its matches more specific, or merge the two", winner.Kind, winner.Namespace, winner.Name, on)})
	}
	return kept, problems
}

// matchKey identifies a match up to the order of its header and query
// conditions.
func matchKey(mt RouteMatch) string {
	mt.Headers = slices.Clone(mt.Headers)
	mt.QueryParams = slices.Clone(mt.QueryParams)
	byName := func(a, b ValueMatch) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Type, b.Type), cmp.Compare(a.Value, b.Value))
	}
	for i := range mt.Headers {
		mt.Headers[i].Name = strings.ToLower(mt.Headers[i].Name)
	}
	slices.SortFunc(mt.Headers, byName)
	slices.SortFunc(mt.QueryParams, byName)
	b, _ := json.Marshal(mt)
	return string(b)
}

var matchField = regexp.MustCompile(`^spec\.rules\[\d+\]\.matches`)

func isMatchField(field string) bool { return matchField.MatchString(field) }

// validateRoute reports what the translator cannot program faithfully.
// Invalid matches make the route unprogrammable (reported on matches);
// invalid backends and unsupported filters make the rule answer HTTP 500,
// as Gateway API requires.
func (m *Mesh) validateRoute(r *rawRoute) []Problem {
	var problems []Problem
	bad := func(field, reason, cond, format string, args ...any) {
		problems = append(problems, Problem{Object: r.ref(), Field: field, Reason: reason, Condition: cond, Message: fmt.Sprintf(format, args...)})
	}
	checkRegex := func(field, expr string) {
		if _, err := regexp.Compile(expr); err != nil {
			bad(field, ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted, "invalid RE2 regular expression %q: %v", expr, err)
		}
	}
	// backendFilter reports a filter type Trellis does not apply on a
	// backendRef (HTTPRoute and GRPCRoute share the names).
	backendFilter := func(rule, ref, filter int, typ string) {
		if typ != string(gwv1.HTTPRouteFilterRequestHeaderModifier) && typ != string(gwv1.HTTPRouteFilterResponseHeaderModifier) {
			bad(fmt.Sprintf("spec.rules[%d].backendRefs[%d].filters[%d].type", rule, ref, filter), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
				"filter %s on a backendRef is not supported by Trellis (only RequestHeaderModifier and ResponseHeaderModifier are): requests matching this rule get HTTP 500; put it on the rule instead", typ)
		}
	}
	checkBackends := func(rule int, refs []gwv1.BackendRef) {
		total := int32(0)
		for k, b := range refs {
			field := fmt.Sprintf("spec.rules[%d].backendRefs[%d]", rule, k)
			total += ptr.Deref(b.Weight, 1)
			if _, _, p := m.resolveBackend(r, b.BackendObjectReference); p != nil {
				p.Object, p.Field = r.ref(), field
				problems = append(problems, *p)
			}
		}
		if len(refs) > 0 && total == 0 {
			bad(fmt.Sprintf("spec.rules[%d].backendRefs", rule), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
				"every backendRef has weight 0: requests matching this rule get HTTP 500")
		}
	}
	// checkRule reports what both route kinds share: backends, the filter
	// types on each, sessionPersistence.
	checkRule := func(rule int, refs []gwv1.BackendRef, filterTypes [][]string, sessionPersistence bool) {
		for k, types := range filterTypes {
			for j, typ := range types {
				backendFilter(rule, k, j, typ)
			}
		}
		checkBackends(rule, refs)
		if sessionPersistence {
			bad(fmt.Sprintf("spec.rules[%d].sessionPersistence", rule), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
				"sessionPersistence is not supported by Trellis and is ignored; use a BackendPolicy with loadBalancer.algorithm RingHash")
		}
	}
	if r.http != nil {
		for i, rule := range r.http.Rules {
			for j, mt := range rule.Matches {
				if mt.Path != nil && mt.Path.Type != nil && *mt.Path.Type == gwv1.PathMatchRegularExpression {
					checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].path.value", i, j), ptr.Deref(mt.Path.Value, ""))
				} else if mt.Path != nil && !ValidPath(ptr.Deref(mt.Path.Value, "/")) {
					bad(fmt.Sprintf("spec.rules[%d].matches[%d].path.value", i, j), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
						"path %q must start with / and contain no ? or #", ptr.Deref(mt.Path.Value, ""))
				}
				for k, h := range mt.Headers {
					if h.Type != nil && *h.Type == gwv1.HeaderMatchRegularExpression {
						checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].headers[%d].value", i, j, k), h.Value)
					}
				}
				for k, q := range mt.QueryParams {
					if q.Type != nil && *q.Type == gwv1.QueryParamMatchRegularExpression {
						checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].queryParams[%d].value", i, j, k), q.Value)
					}
				}
			}
			for j, f := range rule.Filters {
				if !supportedHTTPFilter(f.Type) {
					bad(fmt.Sprintf("spec.rules[%d].filters[%d].type", i, j), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
						"filter %s is not supported by Trellis: requests matching this rule get HTTP 500", f.Type)
				}
				if f.RequestMirror != nil {
					if _, _, p := m.resolveBackend(r, f.RequestMirror.BackendRef); p != nil {
						p.Object, p.Field = r.ref(), fmt.Sprintf("spec.rules[%d].filters[%d].requestMirror.backendRef", i, j)
						problems = append(problems, *p)
					}
				}
			}
			refs, types := make([]gwv1.BackendRef, len(rule.BackendRefs)), make([][]string, len(rule.BackendRefs))
			for k, b := range rule.BackendRefs {
				refs[k] = b.BackendRef
				for _, f := range b.Filters {
					types[k] = append(types[k], string(f.Type))
				}
			}
			checkRule(i, refs, types, rule.SessionPersistence != nil)
		}
	}
	if r.grpc != nil {
		for i, rule := range r.grpc.Rules {
			for j, mt := range rule.Matches {
				if mt.Method != nil && mt.Method.Type != nil && *mt.Method.Type == gwv1.GRPCMethodMatchRegularExpression {
					if mt.Method.Service != nil {
						checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].method.service", i, j), *mt.Method.Service)
					}
					if mt.Method.Method != nil {
						checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].method.method", i, j), *mt.Method.Method)
					}
				}
				for k, h := range mt.Headers {
					if h.Type != nil && *h.Type == gwv1.GRPCHeaderMatchRegularExpression {
						checkRegex(fmt.Sprintf("spec.rules[%d].matches[%d].headers[%d].value", i, j, k), h.Value)
					}
				}
			}
			for j, f := range rule.Filters {
				switch f.Type {
				case gwv1.GRPCRouteFilterRequestHeaderModifier, gwv1.GRPCRouteFilterResponseHeaderModifier, gwv1.GRPCRouteFilterRequestMirror:
				default:
					bad(fmt.Sprintf("spec.rules[%d].filters[%d].type", i, j), ReasonUnsupportedValue, meshv1alpha1.ConditionAccepted,
						"filter %s is not supported by Trellis: requests matching this rule get HTTP 500", f.Type)
				}
			}
			refs, types := make([]gwv1.BackendRef, len(rule.BackendRefs)), make([][]string, len(rule.BackendRefs))
			for k, b := range rule.BackendRefs {
				refs[k] = b.BackendRef
				for _, f := range b.Filters {
					types[k] = append(types[k], string(f.Type))
				}
			}
			checkRule(i, refs, types, rule.SessionPersistence != nil)
		}
	}
	return problems
}

func supportedHTTPFilter(t gwv1.HTTPRouteFilterType) bool {
	switch t {
	case gwv1.HTTPRouteFilterRequestHeaderModifier, gwv1.HTTPRouteFilterResponseHeaderModifier,
		gwv1.HTTPRouteFilterRequestRedirect, gwv1.HTTPRouteFilterURLRewrite, gwv1.HTTPRouteFilterRequestMirror:
		return true
	}
	return false
}

// resolveBackend resolves a route's backendRef to a Service port. A problem
// means requests for that backend must fail (HTTP 500).
//
// A backendRef to another namespace needs a ReferenceGrant there, except
// to a Service the route names as a parentRef: a consumer route (GEP-1686)
// that sends its namespace's calls on to the Service they were made to
// reaches nothing its clients could not call directly.
func (m *Mesh) resolveBackend(r *rawRoute, b gwv1.BackendObjectReference) (*Service, *ServicePort, *Problem) {
	if !isServiceRef(b.Group, b.Kind) {
		return nil, nil, &Problem{Reason: ReasonInvalidKind, Condition: meshv1alpha1.ConditionResolvedRefs,
			Message: fmt.Sprintf("backendRef kind %s is not supported: only Services", ptr.Deref(b.Kind, ""))}
	}
	ns := r.namespace
	if b.Namespace != nil && string(*b.Namespace) != r.namespace {
		ns = string(*b.Namespace)
		if !r.hasServiceParent(ns, string(b.Name)) && !m.granted(r.kind, r.namespace, ns, string(b.Name)) {
			return nil, nil, &Problem{Reason: ReasonRefNotPermitted, Condition: meshv1alpha1.ConditionResolvedRefs,
				Message: fmt.Sprintf("backendRef to Service %s/%s in another namespace needs a ReferenceGrant in %s from %s in %s", ns, b.Name, ns, r.kind, r.namespace)}
		}
	}
	svc := m.Service(ns, string(b.Name))
	if svc == nil {
		return nil, nil, &Problem{Reason: ReasonBackendNotFound, Condition: meshv1alpha1.ConditionResolvedRefs,
			Message: fmt.Sprintf("backend Service %s/%s does not exist", ns, b.Name)}
	}
	if b.Port == nil {
		return nil, nil, &Problem{Reason: ReasonUnsupportedValue, Condition: meshv1alpha1.ConditionResolvedRefs,
			Message: fmt.Sprintf("backendRef to Service %s needs a port", b.Name)}
	}
	p := svc.Port(int32(*b.Port))
	if p == nil {
		return nil, nil, &Problem{Reason: ReasonBackendNotFound, Condition: meshv1alpha1.ConditionResolvedRefs,
			Message: fmt.Sprintf("backend Service %s/%s has no port %d", ns, b.Name, *b.Port)}
	}
	return svc, p, nil
}

// hasServiceParent says whether one of the route's parentRefs is the
// Service namespace/name.
func (r *rawRoute) hasServiceParent(namespace, name string) bool {
	for _, p := range r.parents {
		if isServiceRef(p.Group, p.Kind) && string(p.Name) == name && string(ptr.Deref(p.Namespace, gwv1.Namespace(r.namespace))) == namespace {
			return true
		}
	}
	return false
}

// granted says whether a ReferenceGrant in toNamespace lets routes of kind
// routeKind in fromNamespace refer to the Service name.
func (m *Mesh) granted(routeKind, fromNamespace, toNamespace, name string) bool {
	for _, g := range m.grants {
		if g.Namespace != toNamespace {
			continue
		}
		from := slices.ContainsFunc(g.Spec.From, func(f gwv1.ReferenceGrantFrom) bool {
			return string(f.Group) == gwv1.GroupName && string(f.Kind) == routeKind && string(f.Namespace) == fromNamespace
		})
		to := slices.ContainsFunc(g.Spec.To, func(t gwv1.ReferenceGrantTo) bool {
			return (t.Group == "" || t.Group == "core") && t.Kind == "Service" && (t.Name == nil || string(*t.Name) == name)
		})
		if from && to {
			return true
		}
	}
	return false
}

// ValidPath says whether an Exact or PathPrefix value is a path Envoy can
// match: it starts with "/" and has no query or fragment.
func ValidPath(p string) bool {
	return strings.HasPrefix(p, "/") && !strings.ContainsAny(p, "?#")
}

// MisgroupedServiceParents are the indexes of parentRefs with kind Service
// but no group (or Gateway API's group): Gateway API defaults the group to
// gateway.networking.k8s.io, a group without that kind, so no mesh (and no
// gateway) picks the route up for that parent, and nothing else says so.
func MisgroupedServiceParents(refs []gwv1.ParentReference) []int {
	var out []int
	for i, p := range refs {
		if p.Kind != nil && *p.Kind == "Service" && (p.Group == nil || *p.Group == gwv1.GroupName) {
			out = append(out, i)
		}
	}
	return out
}

// MisgroupedServiceParentMessage says what is wrong with such a parentRef
// and what to write instead.
func MisgroupedServiceParentMessage(p gwv1.ParentReference) string {
	return fmt.Sprintf(`kind Service with group %q (Gateway API's default) names no Service, so no mesh programs this route; for a mesh (GAMMA) route to Service %s write group: ""`, gwv1.GroupName, p.Name)
}
