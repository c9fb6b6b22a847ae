package translate

import (
	"cmp"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// NotDeliveredHeader marks a server sidecar's own 503 that clients may
// retry on another endpoint: it could not connect to its application (the
// request never reached it, whatever its method), or the application
// closed the connection before answering a safe method (hcm.go).
const NotDeliveredHeader = "x-trellis-not-delivered"

// defaultRetryOn applies when no BackendPolicy sets retries: failures where
// the request surely did not reach the application (with the server
// sidecar's NotDeliveredHeader, added to every policy).
const defaultRetryOn = "connect-failure,refused-stream,unavailable,cancelled"

// rankedRoute is an Envoy route with its Gateway API precedence.
type rankedRoute struct {
	route *routev3.Route
	// precedence keys, compared in order (larger first, then smaller age)
	pathClass  int // exact 3, regular expression 2, prefix 1 (as Envoy Gateway orders them)
	pathLen    int
	method     bool
	headers    int
	queries    int
	created    int64
	owner      string
	ruleIndex  int
	matchIndex int
}

// serviceRoutes are the routes of a Service port's virtual host: the
// HTTPRoute/GRPCRoute rules that apply to this proxy's namespace in Gateway
// API precedence order
// (https://gateway-api.sigs.k8s.io/reference/spec/#gateway.networking.k8s.io/v1.HTTPRouteRule),
// or a single default route to the Service.
func (t *translator) serviceRoutes(svc *model.Service, sp *model.ServicePort) []*routev3.Route {
	var ranked []rankedRoute
	for _, r := range svc.RoutesFor(t.proxy.Namespace) {
		if r.Port != 0 && r.Port != sp.Port {
			continue
		}
		if r.HTTP != nil {
			ranked = append(ranked, t.httpRoute(svc, sp, r)...)
		}
		if r.GRPC != nil {
			ranked = append(ranked, t.grpcRoute(svc, sp, r)...)
		}
	}
	if len(ranked) == 0 {
		cluster := t.serviceCluster(svc, sp)
		action := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}
		t.applyRoutePolicy(action, svc, nil, nil)
		return []*routev3.Route{{
			Name:   "default",
			Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: action},
		}}
	}
	slices.SortStableFunc(ranked, func(a, b rankedRoute) int {
		return cmp.Or(
			-cmp.Compare(a.pathClass, b.pathClass),
			-cmp.Compare(a.pathLen, b.pathLen),
			-cmpBool(a.method, b.method),
			-cmp.Compare(a.headers, b.headers),
			-cmp.Compare(a.queries, b.queries),
			cmp.Compare(a.created, b.created),
			cmp.Compare(a.owner, b.owner),
			cmp.Compare(a.ruleIndex, b.ruleIndex),
			cmp.Compare(a.matchIndex, b.matchIndex),
		)
	})
	out := make([]*routev3.Route, len(ranked))
	for i, r := range ranked {
		out[i] = r.route
	}
	return out
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// applyRoutePolicy sets timeout and retries: the route's own (Gateway API
// timeouts and retry) win over the BackendPolicy of the parent Service.
func (t *translator) applyRoutePolicy(a *routev3.RouteAction, svc *model.Service, timeouts *gwv1.HTTPRouteTimeouts, retry *gwv1.HTTPRouteRetry) {
	a.Timeout = dur(0) // Envoy's 15 s default would cut long calls; no timeout unless asked.
	rp := &routev3.RetryPolicy{
		RetryOn: defaultRetryOn, NumRetries: wrapperspb.UInt32(2),
		// A retry goes to another endpoint when there is one (Istio's
		// default): the endpoint that failed is likely going away.
		RetryHostPredicate:            []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts", ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushostsv3.PreviousHostsPredicate{})}}},
		HostSelectionRetryMaxAttempts: 5,
	}
	if svc.Policy != nil {
		spec := svc.Policy.Spec
		if spec.Timeout != nil {
			if d, ok := parseDuration(string(*spec.Timeout)); ok {
				a.Timeout = dur(d)
			}
		}
		if r := spec.Retries; r != nil {
			rp.NumRetries = wrapperspb.UInt32(uint32(max(r.Attempts, 0)))
			if len(r.RetryOn) > 0 {
				on := make([]string, len(r.RetryOn))
				for i, c := range r.RetryOn {
					on[i] = string(c)
				}
				slices.Sort(on)
				rp.RetryOn = strings.Join(on, ",")
			}
			if r.PerTryTimeout != nil {
				if d, ok := parseDuration(string(*r.PerTryTimeout)); ok && d > 0 {
					rp.PerTryTimeout = dur(d)
				}
			}
		}
		if lb := spec.LoadBalancer; lb != nil && lb.HashHeader != nil {
			a.HashPolicy = []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{
				Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: strings.ToLower(*lb.HashHeader)},
			}}}
		}
	}
	if timeouts != nil {
		if timeouts.Request != nil {
			if d, ok := parseGatewayDuration(*timeouts.Request); ok {
				a.Timeout = dur(d)
			}
		}
		if timeouts.BackendRequest != nil {
			if d, ok := parseGatewayDuration(*timeouts.BackendRequest); ok && d > 0 {
				rp.PerTryTimeout = dur(d)
			}
		}
	}
	if retry != nil {
		rp.NumRetries = wrapperspb.UInt32(uint32(max(ptrOr(retry.Attempts, 1), 0)))
		if len(retry.Codes) > 0 {
			// The codes are retried as well as the connection failures
			// every route retries (Gateway API lets implementations retry
			// connection errors; Istio does the same).
			rp.RetryOn = defaultRetryOn + ",retriable-status-codes"
			for _, c := range retry.Codes {
				rp.RetriableStatusCodes = append(rp.RetriableStatusCodes, uint32(c))
			}
		}
		if retry.Backoff != nil {
			if d, ok := parseGatewayDuration(*retry.Backoff); ok && d > 0 {
				rp.RetryBackOff = &routev3.RetryPolicy_RetryBackOff{BaseInterval: dur(d)}
			}
		}
	}
	// Whatever else is retried, so is a request the server's sidecar could
	// not deliver to its application (it says so in NotDeliveredHeader):
	// e.g. an endpoint whose app is shutting down before its EDS removal
	// reached this client.
	// gRPC's xDS client has neither (gRFC A44): proxyless routes keep codes.
	if t.proxyless {
		rp.RetryHostPredicate, rp.HostSelectionRetryMaxAttempts = nil, 0
	} else if !strings.Contains(rp.RetryOn, "retriable-headers") {
		rp.RetryOn += ",retriable-headers"
		rp.RetriableHeaders = []*routev3.HeaderMatcher{{Name: NotDeliveredHeader, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}
	}
	switch {
	case t.proxyless && rp.NumRetries.GetValue() == 0:
		// gRPC (Go, C-core, grpc-js) NACKs num_retries 0 — the whole
		// RouteConfiguration, so every call to the Service would fail —
		// and has no per-try timeout: no retry policy at all.
	case rp.NumRetries.GetValue() > 0 || rp.PerTryTimeout != nil:
		a.RetryPolicy = rp
	}
}

func parseGatewayDuration(d gwv1.Duration) (time.Duration, bool) { return parseDuration(string(d)) }

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// backend is a rule's backendRef with the header filters of its own
// (HTTPRoute and GRPCRoute alike).
type backend struct {
	gwv1.BackendRef
	request, response []*gwv1.HTTPHeaderFilter
}

// filter records one of the backendRef's filters; false for a type
// Trellis does not support there (HTTPRoute and GRPCRoute share the names).
func (b *backend) filter(typ string, request, response *gwv1.HTTPHeaderFilter) bool {
	switch {
	case typ == string(gwv1.HTTPRouteFilterRequestHeaderModifier) && request != nil:
		b.request = append(b.request, request)
	case typ == string(gwv1.HTTPRouteFilterResponseHeaderModifier) && response != nil:
		b.response = append(b.response, response)
	default:
		return false // reported by the model
	}
	return true
}

func httpBackends(refs []gwv1.HTTPBackendRef) (out []backend, unsupported bool) {
	for _, r := range refs {
		b := backend{BackendRef: r.BackendRef}
		for _, f := range r.Filters {
			unsupported = !b.filter(string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier) || unsupported
		}
		out = append(out, b)
	}
	return out, unsupported
}

func grpcBackends(refs []gwv1.GRPCBackendRef) (out []backend, unsupported bool) {
	for _, r := range refs {
		b := backend{BackendRef: r.BackendRef}
		for _, f := range r.Filters {
			unsupported = !b.filter(string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier) || unsupported
		}
		out = append(out, b)
	}
	return out, unsupported
}

// backendAction builds the cluster or weighted clusters of a rule. Invalid
// backends keep their share of traffic but fail it (Gateway API: HTTP 500);
// Envoy cannot answer 500 from a weighted cluster, so their share goes to
// the BlackHoleCluster (503) and a rule whose backends are all invalid
// answers 500 directly. A backend with header filters is always a weighted
// cluster (even alone): that is where Envoy applies headers per backend.
func (t *translator) backendAction(r *model.Route, refs []backend) (*routev3.RouteAction, bool) {
	type wc struct {
		name              string
		weight            uint32
		request, response []*gwv1.HTTPHeaderFilter
	}
	var valid []wc
	invalid := uint32(0)
	headers := false
	for _, b := range refs {
		w := uint32(max(ptrOr(b.Weight, 1), 0))
		svc, sp, p := t.mesh.ResolveBackend(r, b.BackendObjectReference)
		if p != nil {
			invalid += w
			continue
		}
		if w == 0 {
			continue
		}
		if !t.mayCall(svc) {
			// The proxy may not call this backend: treat as unreachable.
			invalid += w
			continue
		}
		valid = append(valid, wc{t.serviceCluster(svc, sp), w, b.request, b.response})
		headers = headers || len(b.request)+len(b.response) > 0
	}
	if len(valid) == 0 {
		return nil, false
	}
	if len(valid) == 1 && invalid == 0 && !headers {
		return &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: valid[0].name}}, true
	}
	w := &routev3.WeightedCluster{}
	for _, v := range valid {
		cw := &routev3.WeightedCluster_ClusterWeight{Name: v.name, Weight: wrapperspb.UInt32(v.weight)}
		for _, h := range v.request {
			cw.RequestHeadersToAdd = append(cw.RequestHeadersToAdd, headerOptions(h)...)
			cw.RequestHeadersToRemove = append(cw.RequestHeadersToRemove, lower(h.Remove)...)
		}
		for _, h := range v.response {
			cw.ResponseHeadersToAdd = append(cw.ResponseHeadersToAdd, headerOptions(h)...)
			cw.ResponseHeadersToRemove = append(cw.ResponseHeadersToRemove, lower(h.Remove)...)
		}
		w.Clusters = append(w.Clusters, cw)
	}
	if invalid > 0 {
		w.Clusters = append(w.Clusters, &routev3.WeightedCluster_ClusterWeight{Name: BlackHoleCluster, Weight: wrapperspb.UInt32(invalid)})
	}
	if t.proxyless {
		// Older gRPC C-core releases refuse weighted_clusters without
		// total_weight (deprecated in Envoy's API, still read by gRPC).
		var sum uint32
		for _, c := range w.Clusters {
			sum += c.Weight.GetValue()
		}
		w.TotalWeight = wrapperspb.UInt32(sum) //nolint:staticcheck // deprecated for Envoy, required by old gRPC
	}
	return &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: w}}, true
}

func directResponse(status uint32) *routev3.Route_DirectResponse {
	return &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: status}}
}

func (t *translator) httpRoute(svc *model.Service, sp *model.ServicePort, r *model.Route) []rankedRoute {
	var out []rankedRoute
	for i, rule := range r.HTTP.Rules {
		matches := rule.Matches
		if len(matches) == 0 {
			matches = []gwv1.HTTPRouteMatch{{}}
		}
		refs, badFilter := httpBackends(rule.BackendRefs)
		for j, m := range matches {
			unsupported := badFilter
			rm, rank, ok := httpMatch(m)
			if !ok {
				continue // reported by the model; the route is not attached
			}
			route := &routev3.Route{Name: fmt.Sprintf("%s/%s/rule/%d/match/%d", r.Namespace, r.Name, i, j), Match: rm}
			t.httpFilters(route, r, rule.Filters, m, &unsupported)
			if unsupported {
				route.Action = directResponse(500)
				route.RequestHeadersToAdd, route.RequestHeadersToRemove, route.ResponseHeadersToAdd, route.ResponseHeadersToRemove = nil, nil, nil, nil
			} else if route.Action == nil { // not a redirect
				action, ok := t.backendAction(r, refs)
				if !ok {
					route.Action = directResponse(500)
				} else {
					t.applyRoutePolicy(action, svc, rule.Timeouts, rule.Retry)
					t.applyRewrite(action, rule.Filters, m)
					t.applyMirrors(action, r, rule.Filters)
					route.Action = &routev3.Route_Route{Route: action}
				}
			}
			rank.route, rank.created, rank.owner, rank.ruleIndex, rank.matchIndex = route, r.Created, r.Namespace+"/"+r.Name, i, j
			out = append(out, rank)
		}
	}
	return out
}

// httpMatch translates a Gateway API match; ok is false for what cannot be
// matched faithfully (an invalid regex).
func httpMatch(m gwv1.HTTPRouteMatch) (*routev3.RouteMatch, rankedRoute, bool) {
	rm := &routev3.RouteMatch{}
	var rank rankedRoute
	pathType, value := gwv1.PathMatchPathPrefix, "/"
	if m.Path != nil {
		pathType, value = ptrOr(m.Path.Type, gwv1.PathMatchPathPrefix), ptrOr(m.Path.Value, "/")
	}
	if pathType != gwv1.PathMatchRegularExpression && !model.ValidPath(value) {
		return nil, rank, false
	}
	switch pathType {
	case gwv1.PathMatchExact:
		rm.PathSpecifier = &routev3.RouteMatch_Path{Path: value}
		rank.pathClass = 3
	case gwv1.PathMatchRegularExpression:
		if _, err := regexp.Compile(value); err != nil {
			return nil, rank, false
		}
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: value}}
		rank.pathClass = 2
	default:
		rank.pathClass = 1
		// Gateway API prefixes match whole path segments; a trailing slash
		// is ignored ("/foo/" matches "/foo").
		trimmed := strings.TrimRight(value, "/")
		if trimmed == "" {
			rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "/"}
		} else {
			rm.PathSpecifier = &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: trimmed}
		}
	}
	rank.pathLen = len(strings.TrimRight(value, "/"))
	for _, h := range m.Headers {
		hm, ok := headerMatch(string(h.Name), h.Type != nil && *h.Type == gwv1.HeaderMatchRegularExpression, h.Value)
		if !ok {
			return nil, rank, false
		}
		rm.Headers = append(rm.Headers, hm)
	}
	rank.headers = len(m.Headers)
	for _, q := range m.QueryParams {
		sm, ok := stringMatch(q.Type != nil && *q.Type == gwv1.QueryParamMatchRegularExpression, q.Value)
		if !ok {
			return nil, rank, false
		}
		rm.QueryParameters = append(rm.QueryParameters, &routev3.QueryParameterMatcher{
			Name:                         string(q.Name),
			QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: sm},
		})
	}
	rank.queries = len(m.QueryParams)
	if m.Method != nil {
		rm.Headers = append(rm.Headers, &routev3.HeaderMatcher{
			Name:                 ":method",
			HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: string(*m.Method)}}},
		})
		rank.method = true
	}
	return rm, rank, true
}

// headerMatch matches a header (names are case-insensitive: Envoy lowercases them).
func headerMatch(name string, regex bool, value string) (*routev3.HeaderMatcher, bool) {
	sm, ok := stringMatch(regex, value)
	if !ok {
		return nil, false
	}
	return &routev3.HeaderMatcher{Name: strings.ToLower(name), HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: sm}}, true
}

func stringMatch(regex bool, value string) (*matcherv3.StringMatcher, bool) {
	if regex {
		if _, err := regexp.Compile(value); err != nil {
			return nil, false
		}
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: value}}}, true
	}
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: value}}, true
}

// httpFilters applies header modifiers and redirects to the route; it marks
// unsupported filters so the rule answers 500.
func (t *translator) httpFilters(route *routev3.Route, r *model.Route, filters []gwv1.HTTPRouteFilter, m gwv1.HTTPRouteMatch, unsupported *bool) {
	for _, f := range filters {
		switch f.Type {
		case gwv1.HTTPRouteFilterRequestHeaderModifier:
			modifyHeaders(route, f.RequestHeaderModifier, nil)
		case gwv1.HTTPRouteFilterResponseHeaderModifier:
			modifyHeaders(route, nil, f.ResponseHeaderModifier)
		case gwv1.HTTPRouteFilterRequestRedirect:
			if rr := f.RequestRedirect; rr != nil {
				route.Action = &routev3.Route_Redirect{Redirect: redirect(rr, m)}
			}
		case gwv1.HTTPRouteFilterURLRewrite, gwv1.HTTPRouteFilterRequestMirror:
			// applied on the route action
		default:
			*unsupported = true
		}
	}
}

// modifyHeaders applies Gateway API request and response header filters.
func modifyHeaders(route *routev3.Route, req, resp *gwv1.HTTPHeaderFilter) {
	if req != nil {
		route.RequestHeadersToAdd = append(route.RequestHeadersToAdd, headerOptions(req)...)
		route.RequestHeadersToRemove = append(route.RequestHeadersToRemove, lower(req.Remove)...)
	}
	if resp != nil {
		route.ResponseHeadersToAdd = append(route.ResponseHeadersToAdd, headerOptions(resp)...)
		route.ResponseHeadersToRemove = append(route.ResponseHeadersToRemove, lower(resp.Remove)...)
	}
}

func lower(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToLower(s)
	}
	return out
}

func headerOptions(h *gwv1.HTTPHeaderFilter) []*corev3.HeaderValueOption {
	var out []*corev3.HeaderValueOption
	for _, s := range h.Set {
		out = append(out, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: strings.ToLower(string(s.Name)), Value: s.Value},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	for _, a := range h.Add {
		out = append(out, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: strings.ToLower(string(a.Name)), Value: a.Value},
			AppendAction: corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD,
		})
	}
	return out
}

func redirect(rr *gwv1.HTTPRequestRedirectFilter, m gwv1.HTTPRouteMatch) *routev3.RedirectAction {
	ra := &routev3.RedirectAction{}
	if rr.Scheme != nil {
		ra.SchemeRewriteSpecifier = &routev3.RedirectAction_SchemeRedirect{SchemeRedirect: *rr.Scheme}
	}
	if rr.Hostname != nil {
		ra.HostRedirect = string(*rr.Hostname)
	}
	if rr.Port != nil {
		ra.PortRedirect = uint32(*rr.Port)
	}
	if p := rr.Path; p != nil {
		switch p.Type {
		case gwv1.FullPathHTTPPathModifier:
			ra.PathRewriteSpecifier = &routev3.RedirectAction_PathRedirect{PathRedirect: ptrOr(p.ReplaceFullPath, "/")}
		case gwv1.PrefixMatchHTTPPathModifier:
			ra.PathRewriteSpecifier = &routev3.RedirectAction_PrefixRewrite{PrefixRewrite: ptrOr(p.ReplacePrefixMatch, "/")}
		}
	}
	switch ptrOr(rr.StatusCode, 302) {
	case 301:
		ra.ResponseCode = routev3.RedirectAction_MOVED_PERMANENTLY
	case 303:
		ra.ResponseCode = routev3.RedirectAction_SEE_OTHER
	case 307:
		ra.ResponseCode = routev3.RedirectAction_TEMPORARY_REDIRECT
	case 308:
		ra.ResponseCode = routev3.RedirectAction_PERMANENT_REDIRECT
	default:
		ra.ResponseCode = routev3.RedirectAction_FOUND
	}
	return ra
}

// applyRewrite implements URLRewrite. ReplacePrefixMatch "/" would leave a
// double slash with Envoy's prefix_rewrite ("/foo/bar" -> "//bar"), so it is
// done with a regex that also eats the separator.
func (t *translator) applyRewrite(a *routev3.RouteAction, filters []gwv1.HTTPRouteFilter, m gwv1.HTTPRouteMatch) {
	for _, f := range filters {
		if f.Type != gwv1.HTTPRouteFilterURLRewrite || f.URLRewrite == nil {
			continue
		}
		if h := f.URLRewrite.Hostname; h != nil {
			a.HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: string(*h)}
		}
		p := f.URLRewrite.Path
		if p == nil {
			continue
		}
		switch p.Type {
		case gwv1.FullPathHTTPPathModifier:
			a.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: "^/.*$"}, Substitution: ptrOr(p.ReplaceFullPath, "/")}
		case gwv1.PrefixMatchHTTPPathModifier:
			repl := ptrOr(p.ReplacePrefixMatch, "/")
			prefix := "/"
			if m.Path != nil && ptrOr(m.Path.Type, gwv1.PathMatchPathPrefix) == gwv1.PathMatchPathPrefix {
				prefix = strings.TrimRight(ptrOr(m.Path.Value, "/"), "/")
			}
			if repl == "/" && prefix != "" && prefix != "/" {
				a.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{
					Pattern:      &matcherv3.RegexMatcher{Regex: "^" + regexp.QuoteMeta(prefix) + "/*"},
					Substitution: "/",
				}
			} else {
				a.PrefixRewrite = repl
			}
		}
	}
}

func (t *translator) applyMirrors(a *routev3.RouteAction, r *model.Route, filters []gwv1.HTTPRouteFilter) {
	for _, f := range filters {
		if f.Type != gwv1.HTTPRouteFilterRequestMirror || f.RequestMirror == nil {
			continue
		}
		t.addMirror(a, r, f.RequestMirror)
	}
}

func (t *translator) addMirror(a *routev3.RouteAction, r *model.Route, m *gwv1.HTTPRequestMirrorFilter) {
	svc, sp, p := t.mesh.ResolveBackend(r, m.BackendRef)
	if p != nil {
		return // reported by the model
	}
	policy := &routev3.RouteAction_RequestMirrorPolicy{Cluster: t.serviceCluster(svc, sp)}
	switch {
	case m.Percent != nil:
		policy.RuntimeFraction = &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{
			Numerator: uint32(min(max(*m.Percent, 0), 100)), Denominator: typev3.FractionalPercent_HUNDRED,
		}}
	case m.Fraction != nil && ptrOr(m.Fraction.Denominator, 100) > 0:
		den := ptrOr(m.Fraction.Denominator, 100)
		policy.RuntimeFraction = &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{
			Numerator: uint32(int64(min(max(m.Fraction.Numerator, 0), den)) * 1000000 / int64(den)), Denominator: typev3.FractionalPercent_MILLION,
		}}
	}
	a.RequestMirrorPolicies = append(a.RequestMirrorPolicies, policy)
}

func (t *translator) grpcRoute(svc *model.Service, sp *model.ServicePort, r *model.Route) []rankedRoute {
	var out []rankedRoute
	for i, rule := range r.GRPC.Rules {
		matches := rule.Matches
		if len(matches) == 0 {
			matches = []gwv1.GRPCRouteMatch{{}}
		}
		refs, badFilter := grpcBackends(rule.BackendRefs)
		for j, m := range matches {
			rm, rank, ok := grpcMatch(m)
			if !ok {
				continue
			}
			route := &routev3.Route{Name: fmt.Sprintf("%s/%s/rule/%d/match/%d", r.Namespace, r.Name, i, j), Match: rm}
			unsupported := badFilter
			action, ok := t.backendAction(r, refs)
			for _, f := range rule.Filters {
				switch f.Type {
				case gwv1.GRPCRouteFilterRequestHeaderModifier:
					modifyHeaders(route, f.RequestHeaderModifier, nil)
				case gwv1.GRPCRouteFilterResponseHeaderModifier:
					modifyHeaders(route, nil, f.ResponseHeaderModifier)
				case gwv1.GRPCRouteFilterRequestMirror:
					if ok && f.RequestMirror != nil {
						t.addMirror(action, r, f.RequestMirror)
					}
				default:
					unsupported = true
				}
			}
			switch {
			case unsupported || !ok:
				route.Action = directResponse(500)
				route.RequestHeadersToAdd, route.RequestHeadersToRemove, route.ResponseHeadersToAdd, route.ResponseHeadersToRemove = nil, nil, nil, nil
			default:
				t.applyRoutePolicy(action, svc, nil, nil)
				route.Action = &routev3.Route_Route{Route: action}
			}
			rank.route, rank.created, rank.owner, rank.ruleIndex, rank.matchIndex = route, r.Created, r.Namespace+"/"+r.Name, i, j
			out = append(out, rank)
		}
	}
	return out
}

// grpcMatch maps a GRPCRoute match onto the HTTP/2 path "/<service>/<method>".
// Precedence (Gateway API GRPCRouteRule): longer service, then longer method,
// then more header matches.
func grpcMatch(m gwv1.GRPCRouteMatch) (*routev3.RouteMatch, rankedRoute, bool) {
	rm := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
	var rank rankedRoute
	if mm := m.Method; mm != nil {
		svc, method := ptrOr(mm.Service, ""), ptrOr(mm.Method, "")
		regex := mm.Type != nil && *mm.Type == gwv1.GRPCMethodMatchRegularExpression
		switch {
		case regex:
			re := "/" + cmp.Or(svc, "[^/]+") + "/" + cmp.Or(method, "[^/]+")
			if _, err := regexp.Compile(re); err != nil {
				return nil, rank, false
			}
			rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}
		case svc != "" && method != "":
			rm.PathSpecifier = &routev3.RouteMatch_Path{Path: "/" + svc + "/" + method}
		case svc != "":
			rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "/" + svc + "/"}
		case method != "":
			rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/[^/]+/" + regexp.QuoteMeta(method)}}
		}
		rank.pathLen = len(svc)*1000 + len(method)
	}
	for _, h := range m.Headers {
		hm, ok := headerMatch(string(h.Name), h.Type != nil && *h.Type == gwv1.GRPCHeaderMatchRegularExpression, h.Value)
		if !ok {
			return nil, rank, false
		}
		rm.Headers = append(rm.Headers, hm)
	}
	rank.headers = len(m.Headers)
	// gRPC requests are HTTP/2 POSTs with a grpc content type.
	rm.Grpc = &routev3.RouteMatch_GrpcRouteMatchOptions{}
	return rm, rank, true
}
