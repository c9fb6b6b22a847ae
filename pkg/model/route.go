package model

import (
	"cmp"
	"time"

	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Route is an HTTPRoute or GRPCRoute attached to a Service (GAMMA),
// resolved by Build: defaults applied, durations parsed, backends resolved
// to Service ports, unsupported filters turned into Fail. The translator
// reads nothing else of the route; what is wrong with it Build reports as
// problems.
type Route struct {
	Kind      string `json:"kind"` // "HTTPRoute" or "GRPCRoute"
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Created orders routes of equal precedence, oldest first (Gateway API).
	Created int64 `json:"created,omitempty"`
	// Port is the parentRef port, 0 for every port of the Service.
	Port int32 `json:"port,omitempty"`
	// Parent is the index of the parentRef this attachment comes from.
	Parent int         `json:"parent"`
	Rules  []RouteRule `json:"rules"`
}

// Ref returns the route's object reference.
func (r *Route) Ref() Ref { return Ref{Kind: r.Kind, Namespace: r.Namespace, Name: r.Name} }

// RouteRule is one rule of a route.
type RouteRule struct {
	// Matches has at least one match (a rule without matches has one that
	// matches every request).
	Matches []RouteMatch `json:"matches"`
	// Fail says the rule answers HTTP 500, as Gateway API requires for a
	// filter Trellis does not support (on the rule or a backendRef).
	Fail bool `json:"fail,omitempty"`
	// RequestHeaders and ResponseHeaders are the rule's header filters, in
	// the order written.
	RequestHeaders  []HeaderFilter `json:"requestHeaders,omitempty"`
	ResponseHeaders []HeaderFilter `json:"responseHeaders,omitempty"`
	// Redirect answers the request with a redirect instead of forwarding
	// it (HTTPRoute only).
	Redirect *Redirect `json:"redirect,omitempty"`
	// Rewrite changes the forwarded request (HTTPRoute only).
	Rewrite *Rewrite `json:"rewrite,omitempty"`
	// Mirrors are the resolved RequestMirror backends (a mirror whose
	// backend does not resolve is left out and reported).
	Mirrors  []Mirror  `json:"mirrors,omitempty"`
	Backends []Backend `json:"backends,omitempty"`
	// Timeout is the whole request's timeout (timeouts.request; 0: none);
	// nil leaves the BackendPolicy's.
	Timeout *Duration `json:"timeout,omitempty"`
	// BackendTimeout is each try's timeout (timeouts.backendRequest), nil
	// or positive.
	BackendTimeout *Duration   `json:"backendTimeout,omitempty"`
	Retry          *RouteRetry `json:"retry,omitempty"`
}

// MatchType says how a value is matched.
type MatchType string

const (
	MatchExact MatchType = "Exact"
	// MatchPrefix matches whole path segments (Gateway API's PathPrefix).
	MatchPrefix MatchType = "PathPrefix"
	MatchRegex  MatchType = "RegularExpression"
)

// RouteMatch is one match of a rule; every condition must hold.
type RouteMatch struct {
	// Path of an HTTPRoute match (PathPrefix "/" when unset).
	Path PathMatch `json:"path"`
	// Method is the HTTP method, "" for any (HTTPRoute).
	Method string `json:"method,omitempty"`
	// GRPC is set on every GRPCRoute match: the request must be gRPC, for
	// the method given (empty: any).
	GRPC        *GRPCMethod  `json:"grpc,omitempty"`
	Headers     []ValueMatch `json:"headers,omitempty"`
	QueryParams []ValueMatch `json:"queryParams,omitempty"`
}

// PathMatch matches the request path.
type PathMatch struct {
	Type  MatchType `json:"type"`
	Value string    `json:"value"`
}

// ValueMatch matches a header or query parameter (Exact or RegularExpression).
type ValueMatch struct {
	Name  string    `json:"name"`
	Type  MatchType `json:"type"`
	Value string    `json:"value"`
}

// GRPCMethod matches the gRPC service and method; either may be empty.
type GRPCMethod struct {
	Service string `json:"service,omitempty"`
	Method  string `json:"method,omitempty"`
	Regex   bool   `json:"regex,omitempty"`
}

// PathRegex is the regular expression on the HTTP/2 path "/service/method"
// a regex method match stands for.
func (g *GRPCMethod) PathRegex() string {
	return "/" + cmp.Or(g.Service, "[^/]+") + "/" + cmp.Or(g.Method, "[^/]+")
}

// HeaderFilter sets, adds and removes headers (one Gateway API header
// modifier filter).
type HeaderFilter struct {
	Set    []Header `json:"set,omitempty"`
	Add    []Header `json:"add,omitempty"`
	Remove []string `json:"remove,omitempty"`
}

// Header is a header name and value.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Redirect is a RequestRedirect filter.
type Redirect struct {
	Scheme   *string       `json:"scheme,omitempty"`
	Hostname *string       `json:"hostname,omitempty"`
	Port     *int32        `json:"port,omitempty"`
	Path     *PathModifier `json:"path,omitempty"`
	// StatusCode is 301, 302, 303, 307 or 308.
	StatusCode int `json:"statusCode"`
}

// Rewrite is a URLRewrite filter.
type Rewrite struct {
	Hostname *string       `json:"hostname,omitempty"`
	Path     *PathModifier `json:"path,omitempty"`
}

// PathModifier replaces the full path or the matched prefix.
type PathModifier struct {
	// Prefix: Value replaces the prefix the match matched; else the path.
	Prefix bool   `json:"prefix,omitempty"`
	Value  string `json:"value"`
}

// BackendRef names a Service port a route sends to.
type BackendRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Port      int32  `json:"port"`
}

// Backend is one weighted backend of a rule.
type Backend struct {
	// Service is nil when the backendRef does not resolve (reported): its
	// share of the traffic fails.
	Service         *BackendRef    `json:"service,omitempty"`
	Weight          uint32         `json:"weight"`
	RequestHeaders  []HeaderFilter `json:"requestHeaders,omitempty"`
	ResponseHeaders []HeaderFilter `json:"responseHeaders,omitempty"`
}

// Mirror sends a copy of requests to a Service port.
type Mirror struct {
	Service BackendRef `json:"service"`
	// Numerator/Denominator of the requests mirrored: Denominator 100
	// (percent) or 1,000,000 (a fraction); 0 mirrors every request.
	Numerator   uint32 `json:"numerator,omitempty"`
	Denominator uint32 `json:"denominator,omitempty"`
}

// RouteRetry is an HTTPRoute rule's retry.
type RouteRetry struct {
	Attempts uint32 `json:"attempts"`
	// Codes are retried besides connection failures.
	Codes   []uint32 `json:"codes,omitempty"`
	Backoff Duration `json:"backoff,omitempty"`
}

// rawRoute is an HTTPRoute or GRPCRoute as written.
type rawRoute struct {
	kind, namespace, name string
	created               int64
	http                  *gwv1.HTTPRouteSpec
	grpc                  *gwv1.GRPCRouteSpec
	parents               []gwv1.ParentReference
}

func (r *rawRoute) ref() Ref { return Ref{Kind: r.kind, Namespace: r.namespace, Name: r.name} }

// resolve builds the route's rules; validateRoute has reported what is
// wrong with them.
func (m *Mesh) resolve(r *rawRoute) []RouteRule {
	var rules []RouteRule
	if r.http != nil {
		for _, rule := range r.http.Rules {
			out := RouteRule{}
			for _, mt := range rule.Matches {
				out.Matches = append(out.Matches, httpMatch(mt))
			}
			if len(out.Matches) == 0 {
				out.Matches = []RouteMatch{{Path: PathMatch{Type: MatchPrefix, Value: "/"}}}
			}
			for _, f := range rule.Filters {
				switch f.Type {
				case gwv1.HTTPRouteFilterRequestRedirect:
					if f.RequestRedirect != nil {
						out.Redirect = redirect(f.RequestRedirect)
					}
				case gwv1.HTTPRouteFilterURLRewrite:
					if u := f.URLRewrite; u != nil {
						if out.Rewrite == nil {
							out.Rewrite = &Rewrite{}
						}
						if u.Hostname != nil {
							out.Rewrite.Hostname = ptr.To(string(*u.Hostname))
						}
						if p := pathModifier(u.Path); p != nil {
							out.Rewrite.Path = p
						}
					}
				default:
					out.Fail = !m.sharedFilter(&out, r, string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier, f.RequestMirror) || out.Fail
				}
			}
			for _, b := range rule.BackendRefs {
				be := m.backend(r, b.BackendRef)
				for _, f := range b.Filters {
					out.Fail = !be.filter(string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier) || out.Fail
				}
				out.Backends = append(out.Backends, be)
			}
			if t := rule.Timeouts; t != nil {
				if t.Request != nil {
					if d, ok := parseDuration(string(*t.Request)); ok {
						out.Timeout = &d
					}
				}
				if t.BackendRequest != nil {
					if d, ok := parseDuration(string(*t.BackendRequest)); ok && d > 0 {
						out.BackendTimeout = &d
					}
				}
			}
			if rt := rule.Retry; rt != nil {
				retry := &RouteRetry{Attempts: uint32(max(ptr.Deref(rt.Attempts, 1), 0))}
				for _, c := range rt.Codes {
					retry.Codes = append(retry.Codes, uint32(c))
				}
				if rt.Backoff != nil {
					if d, ok := parseDuration(string(*rt.Backoff)); ok && d > 0 {
						retry.Backoff = d
					}
				}
				out.Retry = retry
			}
			rules = append(rules, out)
		}
	}
	if r.grpc != nil {
		for _, rule := range r.grpc.Rules {
			out := RouteRule{}
			for _, mt := range rule.Matches {
				out.Matches = append(out.Matches, grpcMatch(mt))
			}
			if len(out.Matches) == 0 {
				out.Matches = []RouteMatch{{Path: PathMatch{Type: MatchPrefix, Value: "/"}, GRPC: &GRPCMethod{}}}
			}
			for _, f := range rule.Filters {
				out.Fail = !m.sharedFilter(&out, r, string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier, f.RequestMirror) || out.Fail
			}
			for _, b := range rule.BackendRefs {
				be := m.backend(r, b.BackendRef)
				for _, f := range b.Filters {
					out.Fail = !be.filter(string(f.Type), f.RequestHeaderModifier, f.ResponseHeaderModifier) || out.Fail
				}
				out.Backends = append(out.Backends, be)
			}
			rules = append(rules, out)
		}
	}
	return rules
}

// sharedFilter applies a rule filter of a type HTTPRoute and GRPCRoute
// share (they share the names); false for a type Trellis does not support.
func (m *Mesh) sharedFilter(out *RouteRule, r *rawRoute, typ string, request, response *gwv1.HTTPHeaderFilter, mirror *gwv1.HTTPRequestMirrorFilter) bool {
	switch gwv1.HTTPRouteFilterType(typ) {
	case gwv1.HTTPRouteFilterRequestHeaderModifier:
		out.RequestHeaders = appendHeaderFilter(out.RequestHeaders, request)
	case gwv1.HTTPRouteFilterResponseHeaderModifier:
		out.ResponseHeaders = appendHeaderFilter(out.ResponseHeaders, response)
	case gwv1.HTTPRouteFilterRequestMirror:
		out.Mirrors = m.appendMirror(out.Mirrors, r, mirror)
	default:
		return false
	}
	return true
}

func httpMatch(mt gwv1.HTTPRouteMatch) RouteMatch {
	out := RouteMatch{Path: PathMatch{Type: MatchPrefix, Value: "/"}}
	if mt.Path != nil {
		switch ptr.Deref(mt.Path.Type, gwv1.PathMatchPathPrefix) {
		case gwv1.PathMatchExact:
			out.Path.Type = MatchExact
		case gwv1.PathMatchRegularExpression:
			out.Path.Type = MatchRegex
		}
		out.Path.Value = ptr.Deref(mt.Path.Value, "/")
	}
	if mt.Method != nil {
		out.Method = string(*mt.Method)
	}
	for _, h := range mt.Headers {
		out.Headers = append(out.Headers, ValueMatch{Name: string(h.Name), Type: valueMatchType(h.Type != nil && *h.Type == gwv1.HeaderMatchRegularExpression), Value: h.Value})
	}
	for _, q := range mt.QueryParams {
		out.QueryParams = append(out.QueryParams, ValueMatch{Name: string(q.Name), Type: valueMatchType(q.Type != nil && *q.Type == gwv1.QueryParamMatchRegularExpression), Value: q.Value})
	}
	return out
}

func grpcMatch(mt gwv1.GRPCRouteMatch) RouteMatch {
	out := RouteMatch{Path: PathMatch{Type: MatchPrefix, Value: "/"}, GRPC: &GRPCMethod{}}
	if mm := mt.Method; mm != nil {
		out.GRPC = &GRPCMethod{Service: ptr.Deref(mm.Service, ""), Method: ptr.Deref(mm.Method, ""), Regex: mm.Type != nil && *mm.Type == gwv1.GRPCMethodMatchRegularExpression}
	}
	for _, h := range mt.Headers {
		out.Headers = append(out.Headers, ValueMatch{Name: string(h.Name), Type: valueMatchType(h.Type != nil && *h.Type == gwv1.GRPCHeaderMatchRegularExpression), Value: h.Value})
	}
	return out
}

func valueMatchType(regex bool) MatchType {
	if regex {
		return MatchRegex
	}
	return MatchExact
}

func appendHeaderFilter(to []HeaderFilter, h *gwv1.HTTPHeaderFilter) []HeaderFilter {
	if h == nil {
		return to
	}
	var f HeaderFilter
	for _, s := range h.Set {
		f.Set = append(f.Set, Header{Name: string(s.Name), Value: s.Value})
	}
	for _, a := range h.Add {
		f.Add = append(f.Add, Header{Name: string(a.Name), Value: a.Value})
	}
	f.Remove = append(f.Remove, h.Remove...)
	return append(to, f)
}

func redirect(rr *gwv1.HTTPRequestRedirectFilter) *Redirect {
	out := &Redirect{Scheme: rr.Scheme, Path: pathModifier(rr.Path), StatusCode: ptr.Deref(rr.StatusCode, 302)}
	if rr.Hostname != nil {
		out.Hostname = ptr.To(string(*rr.Hostname))
	}
	if rr.Port != nil {
		out.Port = ptr.To(int32(*rr.Port))
	}
	switch out.StatusCode {
	case 301, 302, 303, 307, 308:
	default:
		out.StatusCode = 302
	}
	return out
}

func pathModifier(p *gwv1.HTTPPathModifier) *PathModifier {
	if p == nil {
		return nil
	}
	switch p.Type {
	case gwv1.FullPathHTTPPathModifier:
		return &PathModifier{Value: ptr.Deref(p.ReplaceFullPath, "/")}
	case gwv1.PrefixMatchHTTPPathModifier:
		return &PathModifier{Prefix: true, Value: ptr.Deref(p.ReplacePrefixMatch, "/")}
	}
	return nil
}

// backend resolves a backendRef; Service stays nil when it does not
// resolve (validateRoute reported it).
func (m *Mesh) backend(r *rawRoute, b gwv1.BackendRef) Backend {
	out := Backend{Weight: uint32(max(ptr.Deref(b.Weight, 1), 0))}
	if svc, sp, p := m.resolveBackend(r, b.BackendObjectReference); p == nil {
		out.Service = &BackendRef{Namespace: svc.Namespace, Name: svc.Name, Port: sp.Port}
	}
	return out
}

// filter records one of a backendRef's filters; false for a type Trellis
// does not support there (HTTPRoute and GRPCRoute share the names).
func (b *Backend) filter(typ string, request, response *gwv1.HTTPHeaderFilter) bool {
	switch {
	case typ == string(gwv1.HTTPRouteFilterRequestHeaderModifier) && request != nil:
		b.RequestHeaders = appendHeaderFilter(b.RequestHeaders, request)
	case typ == string(gwv1.HTTPRouteFilterResponseHeaderModifier) && response != nil:
		b.ResponseHeaders = appendHeaderFilter(b.ResponseHeaders, response)
	default:
		return false
	}
	return true
}

func (m *Mesh) appendMirror(to []Mirror, r *rawRoute, f *gwv1.HTTPRequestMirrorFilter) []Mirror {
	if f == nil {
		return to
	}
	svc, sp, p := m.resolveBackend(r, f.BackendRef)
	if p != nil {
		return to
	}
	mr := Mirror{Service: BackendRef{Namespace: svc.Namespace, Name: svc.Name, Port: sp.Port}}
	switch {
	case f.Percent != nil:
		mr.Numerator, mr.Denominator = uint32(min(max(*f.Percent, 0), 100)), 100
	case f.Fraction != nil && ptr.Deref(f.Fraction.Denominator, 100) > 0:
		den := ptr.Deref(f.Fraction.Denominator, 100)
		mr.Numerator, mr.Denominator = uint32(int64(min(max(f.Fraction.Numerator, 0), den))*1000000/int64(den)), 1000000
	}
	return append(to, mr)
}

// Duration is a parsed API duration; it prints as Go's duration strings
// ("1m30s").
type Duration time.Duration

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText prints d as String does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText parses Go's duration strings.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// parseDuration parses an API duration (the CRD patterns guarantee the
// form); false for what is not one or is negative.
func parseDuration(s string) (Duration, bool) {
	d, err := time.ParseDuration(s)
	return Duration(d), err == nil && d >= 0
}
