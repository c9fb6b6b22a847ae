package translate

import (
	"cmp"
	"fmt"
	"regexp"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

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
		ranked = append(ranked, t.route(svc, r)...)
	}
	if len(ranked) == 0 {
		cluster := t.serviceCluster(svc, sp)
		action := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}
		t.applyRoutePolicy(action, svc, nil)
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

// route translates a route's rules, one Envoy route per match. A rule
// marked Fail, or whose backends all fail, answers HTTP 500 (Gateway API).
func (t *translator) route(svc *model.Service, r *model.Route) []rankedRoute {
	var out []rankedRoute
	for i := range r.Rules {
		rule := &r.Rules[i]
		for j, m := range rule.Matches {
			rm, rank := routeMatch(m)
			route := &routev3.Route{Name: fmt.Sprintf("%s/%s/rule/%d/match/%d", r.Namespace, r.Name, i, j), Match: rm}
			switch {
			case rule.Fail:
				route.Action = directResponse(500)
			case rule.Redirect != nil:
				modifyHeaders(route, rule)
				route.Action = &routev3.Route_Redirect{Redirect: redirect(rule.Redirect)}
			default:
				action, ok := t.backendAction(rule.Backends)
				if !ok {
					route.Action = directResponse(500)
					break
				}
				modifyHeaders(route, rule)
				t.applyRoutePolicy(action, svc, rule)
				applyRewrite(action, rule.Rewrite, m)
				for _, mr := range rule.Mirrors {
					t.addMirror(action, mr)
				}
				route.Action = &routev3.Route_Route{Route: action}
			}
			rank.route, rank.created, rank.owner, rank.ruleIndex, rank.matchIndex = route, r.Created, r.Namespace+"/"+r.Name, i, j
			out = append(out, rank)
		}
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
func (t *translator) applyRoutePolicy(a *routev3.RouteAction, svc *model.Service, rule *model.RouteRule) {
	a.Timeout = noTimeout() // Envoy's 15 s default would cut long calls; no timeout unless asked.
	rp := &routev3.RetryPolicy{
		RetryOn: defaultRetryOn, NumRetries: wrapperspb.UInt32(2),
		// A retry goes to another endpoint when there is one (Istio's
		// default): the endpoint that failed is likely going away.
		RetryHostPredicate:            []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts", ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushostsv3.PreviousHostsPredicate{})}}},
		HostSelectionRetryMaxAttempts: 5,
	}
	if p := svc.Policy; p != nil {
		if p.Timeout != nil {
			a.Timeout = dur(*p.Timeout)
		}
		if r := p.Retries; r != nil {
			rp.NumRetries = wrapperspb.UInt32(r.Attempts)
			if len(r.On) > 0 {
				rp.RetryOn = strings.Join(r.On, ",")
			}
			if r.PerTryTimeout > 0 {
				rp.PerTryTimeout = dur(r.PerTryTimeout)
			}
		}
		if p.HashHeader != "" {
			a.HashPolicy = []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{
				Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: p.HashHeader},
			}}}
		}
	}
	if rule != nil {
		if rule.Timeout != nil {
			a.Timeout = dur(*rule.Timeout)
		}
		if rule.BackendTimeout != nil {
			rp.PerTryTimeout = dur(*rule.BackendTimeout)
		}
	}
	if rule != nil && rule.Retry != nil {
		retry := rule.Retry
		rp.NumRetries = wrapperspb.UInt32(retry.Attempts)
		if len(retry.Codes) > 0 {
			// The codes are retried as well as the connection failures
			// every route retries (Gateway API lets implementations retry
			// connection errors; Istio does the same).
			rp.RetryOn = defaultRetryOn + ",retriable-status-codes"
			rp.RetriableStatusCodes = slices.Clone(retry.Codes)
		}
		if retry.Backoff > 0 {
			rp.RetryBackOff = &routev3.RetryPolicy_RetryBackOff{BaseInterval: dur(retry.Backoff)}
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

// backendAction builds the cluster or weighted clusters of a rule. Invalid
// backends keep their share of traffic but fail it (Gateway API: HTTP 500);
// Envoy cannot answer 500 from a weighted cluster, so their share goes to
// the BlackHoleCluster (503) and a rule whose backends are all invalid
// answers 500 directly. A backend with header filters is always a weighted
// cluster (even alone): that is where Envoy applies headers per backend.
func (t *translator) backendAction(backends []model.Backend) (*routev3.RouteAction, bool) {
	type wc struct {
		name              string
		weight            uint32
		request, response []model.HeaderFilter
	}
	var valid []wc
	invalid := uint32(0)
	headers := false
	for _, b := range backends {
		if b.Service == nil {
			invalid += b.Weight
			continue
		}
		if b.Weight == 0 {
			continue
		}
		svc := t.mesh.Service(b.Service.Namespace, b.Service.Name)
		if !t.mayCall(svc) {
			// The proxy may not call this backend: treat as unreachable.
			invalid += b.Weight
			continue
		}
		valid = append(valid, wc{t.serviceCluster(svc, svc.Port(b.Service.Port)), b.Weight, b.RequestHeaders, b.ResponseHeaders})
		headers = headers || len(b.RequestHeaders)+len(b.ResponseHeaders) > 0
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
		e := edits(v.request, v.response)
		cw.RequestHeadersToAdd, cw.RequestHeadersToRemove, cw.ResponseHeadersToAdd, cw.ResponseHeadersToRemove = e.requestAdd, e.requestRemove, e.responseAdd, e.responseRemove
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

// routeMatch translates a match with its Gateway API precedence keys.
func routeMatch(m model.RouteMatch) (*routev3.RouteMatch, rankedRoute) {
	if m.GRPC != nil {
		return grpcMatch(m)
	}
	rm := &routev3.RouteMatch{}
	var rank rankedRoute
	switch m.Path.Type {
	case model.MatchExact:
		rm.PathSpecifier = &routev3.RouteMatch_Path{Path: m.Path.Value}
		rank.pathClass = 3
	case model.MatchRegex:
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: m.Path.Value}}
		rank.pathClass = 2
	default:
		rank.pathClass = 1
		// Gateway API prefixes match whole path segments; a trailing slash
		// is ignored ("/foo/" matches "/foo").
		trimmed := strings.TrimRight(m.Path.Value, "/")
		if trimmed == "" {
			rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "/"}
		} else {
			rm.PathSpecifier = &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: trimmed}
		}
	}
	rank.pathLen = len(strings.TrimRight(m.Path.Value, "/"))
	rm.Headers = headerMatches(m.Headers)
	rank.headers = len(m.Headers)
	for _, q := range m.QueryParams {
		rm.QueryParameters = append(rm.QueryParameters, &routev3.QueryParameterMatcher{
			Name:                         q.Name,
			QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: stringMatch(q)},
		})
	}
	rank.queries = len(m.QueryParams)
	if m.Method != "" {
		rm.Headers = append(rm.Headers, &routev3.HeaderMatcher{
			Name:                 ":method",
			HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: m.Method}}},
		})
		rank.method = true
	}
	return rm, rank
}

// grpcMatch maps a GRPCRoute match onto the HTTP/2 path "/<service>/<method>".
// Precedence (Gateway API GRPCRouteRule): longer service, then longer method,
// then more header matches.
func grpcMatch(m model.RouteMatch) (*routev3.RouteMatch, rankedRoute) {
	rm := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
	var rank rankedRoute
	g := m.GRPC
	switch {
	case g.Regex:
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: g.PathRegex()}}
	case g.Service != "" && g.Method != "":
		rm.PathSpecifier = &routev3.RouteMatch_Path{Path: "/" + g.Service + "/" + g.Method}
	case g.Service != "":
		rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "/" + g.Service + "/"}
	case g.Method != "":
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/[^/]+/" + regexp.QuoteMeta(g.Method)}}
	}
	rank.pathLen = len(g.Service)*1000 + len(g.Method)
	rm.Headers = headerMatches(m.Headers)
	rank.headers = len(m.Headers)
	// gRPC requests are HTTP/2 POSTs with a grpc content type.
	rm.Grpc = &routev3.RouteMatch_GrpcRouteMatchOptions{}
	return rm, rank
}

// headerMatches match headers (names are case-insensitive: Envoy lowercases them).
func headerMatches(ms []model.ValueMatch) []*routev3.HeaderMatcher {
	var out []*routev3.HeaderMatcher
	for _, h := range ms {
		out = append(out, &routev3.HeaderMatcher{Name: strings.ToLower(h.Name), HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: stringMatch(h)}})
	}
	return out
}

func stringMatch(m model.ValueMatch) *matcherv3.StringMatcher {
	if m.Type == model.MatchRegex {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: m.Value}}}
	}
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: m.Value}}
}

// modifyHeaders applies the rule's request and response header filters.
func modifyHeaders(route *routev3.Route, rule *model.RouteRule) {
	e := edits(rule.RequestHeaders, rule.ResponseHeaders)
	route.RequestHeadersToAdd, route.RequestHeadersToRemove, route.ResponseHeadersToAdd, route.ResponseHeadersToRemove = e.requestAdd, e.requestRemove, e.responseAdd, e.responseRemove
}

// headerEdits are header filters in Envoy's terms (a route and a weighted
// cluster have the same four fields).
type headerEdits struct {
	requestAdd, responseAdd       []*corev3.HeaderValueOption
	requestRemove, responseRemove []string
}

func edits(request, response []model.HeaderFilter) headerEdits {
	var e headerEdits
	for _, h := range request {
		e.requestAdd = append(e.requestAdd, headerOptions(h)...)
		e.requestRemove = append(e.requestRemove, lower(h.Remove)...)
	}
	for _, h := range response {
		e.responseAdd = append(e.responseAdd, headerOptions(h)...)
		e.responseRemove = append(e.responseRemove, lower(h.Remove)...)
	}
	return e
}

func lower(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToLower(s)
	}
	return out
}

func headerOptions(h model.HeaderFilter) []*corev3.HeaderValueOption {
	var out []*corev3.HeaderValueOption
	for _, s := range h.Set {
		out = append(out, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: strings.ToLower(s.Name), Value: s.Value},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	for _, a := range h.Add {
		out = append(out, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: strings.ToLower(a.Name), Value: a.Value},
			AppendAction: corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD,
		})
	}
	return out
}

var redirectCodes = map[int]routev3.RedirectAction_RedirectResponseCode{
	301: routev3.RedirectAction_MOVED_PERMANENTLY,
	302: routev3.RedirectAction_FOUND,
	303: routev3.RedirectAction_SEE_OTHER,
	307: routev3.RedirectAction_TEMPORARY_REDIRECT,
	308: routev3.RedirectAction_PERMANENT_REDIRECT,
}

func redirect(rr *model.Redirect) *routev3.RedirectAction {
	ra := &routev3.RedirectAction{ResponseCode: redirectCodes[rr.StatusCode]}
	if rr.Scheme != nil {
		ra.SchemeRewriteSpecifier = &routev3.RedirectAction_SchemeRedirect{SchemeRedirect: *rr.Scheme}
	}
	if rr.Hostname != nil {
		ra.HostRedirect = *rr.Hostname
	}
	if rr.Port != nil {
		ra.PortRedirect = uint32(*rr.Port)
	}
	if p := rr.Path; p != nil {
		if p.Prefix {
			ra.PathRewriteSpecifier = &routev3.RedirectAction_PrefixRewrite{PrefixRewrite: p.Value}
		} else {
			ra.PathRewriteSpecifier = &routev3.RedirectAction_PathRedirect{PathRedirect: p.Value}
		}
	}
	return ra
}

// applyRewrite implements URLRewrite. ReplacePrefixMatch "/" would leave a
// double slash with Envoy's prefix_rewrite ("/foo/bar" -> "//bar"), so it is
// done with a regex that also eats the separator.
func applyRewrite(a *routev3.RouteAction, rw *model.Rewrite, m model.RouteMatch) {
	if rw == nil {
		return
	}
	if rw.Hostname != nil {
		a.HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: *rw.Hostname}
	}
	p := rw.Path
	switch {
	case p == nil:
	case !p.Prefix:
		a.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: "^/.*$"}, Substitution: p.Value}
	default:
		prefix := "/"
		if m.Path.Type == model.MatchPrefix {
			prefix = strings.TrimRight(m.Path.Value, "/")
		}
		if p.Value == "/" && prefix != "" && prefix != "/" {
			a.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{
				Pattern:      &matcherv3.RegexMatcher{Regex: "^" + regexp.QuoteMeta(prefix) + "/*"},
				Substitution: "/",
			}
		} else {
			a.PrefixRewrite = p.Value
		}
	}
}

func (t *translator) addMirror(a *routev3.RouteAction, m model.Mirror) {
	svc := t.mesh.Service(m.Service.Namespace, m.Service.Name)
	policy := &routev3.RouteAction_RequestMirrorPolicy{Cluster: t.serviceCluster(svc, svc.Port(m.Service.Port))}
	switch m.Denominator {
	case 100:
		policy.RuntimeFraction = &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: m.Numerator, Denominator: typev3.FractionalPercent_HUNDRED}}
	case 1000000:
		policy.RuntimeFraction = &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: m.Numerator, Denominator: typev3.FractionalPercent_MILLION}}
	}
	a.RequestMirrorPolicies = append(a.RequestMirrorPolicies, policy)
}
