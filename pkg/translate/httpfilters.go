package translate

import (
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	healthcheckv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	localratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/local_ratelimit/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/proto"
)

// httpFilterInput is what the HTTP filters of one connection manager are
// built from; an empty field leaves its filter out.
type httpFilterInput struct {
	// healthChecks answer probe paths from Envoy's view of the app's
	// health (the stats listener's probes, probes.go).
	healthChecks []*healthcheckv3.HealthCheck
	// deny and allow are an inbound port's AccessPolicy rules (Deny is
	// evaluated first: Deny wins).
	deny, allow *rbacv3.RBAC
	// rbacStatPrefixes gives the RBAC filters the "deny." / "allow." stat
	// prefixes (sidecars; proxyless gRPC keeps no stats).
	rbacStatPrefixes bool
	rateLimit        *localratelimitv3.LocalRateLimit
	fault            *faultv3.HTTPFault
}

// httpFilter is one HTTP filter Trellis may put into a connection manager.
type httpFilter struct {
	// name is Envoy's filter name.
	name string
	// config is the type of the filter's typed_config.
	config proto.Message
	// build returns the filter's configs for in, in order (none: absent).
	build func(in *httpFilterInput) []proto.Message
}

// httpFilters is every HTTP filter the translator emits, in the one order
// they run in every connection manager (Envoy runs HTTP filters in list
// order; the router, which forwards, is last). A new filter is a new entry
// here, and its place in this list is its place in every chain; the
// simulator must handle each entry's config type (pkg/translate/simulate
// TestSimulatorKnowsEveryHTTPFilter fails otherwise).
var httpFilters = []httpFilter{
	{"envoy.filters.http.health_check", &healthcheckv3.HealthCheck{}, func(in *httpFilterInput) []proto.Message {
		out := make([]proto.Message, 0, len(in.healthChecks))
		for _, h := range in.healthChecks {
			out = append(out, h)
		}
		return out
	}},
	{"envoy.filters.http.rbac", &rbachttpv3.RBAC{}, func(in *httpFilterInput) []proto.Message {
		return rbacFilter(in.deny, in.rbacStatPrefixes, "deny.")
	}},
	{"envoy.filters.http.rbac", &rbachttpv3.RBAC{}, func(in *httpFilterInput) []proto.Message {
		return rbacFilter(in.allow, in.rbacStatPrefixes, "allow.")
	}},
	{"envoy.filters.http.local_ratelimit", &localratelimitv3.LocalRateLimit{}, func(in *httpFilterInput) []proto.Message {
		if in.rateLimit == nil {
			return nil
		}
		return []proto.Message{in.rateLimit}
	}},
	{"envoy.filters.http.fault", &faultv3.HTTPFault{}, func(in *httpFilterInput) []proto.Message {
		if in.fault == nil {
			return nil
		}
		return []proto.Message{in.fault}
	}},
	{"envoy.filters.http.router", &routerv3.Router{}, func(*httpFilterInput) []proto.Message {
		return []proto.Message{&routerv3.Router{}}
	}},
}

func rbacFilter(rules *rbacv3.RBAC, statPrefix bool, prefix string) []proto.Message {
	if rules == nil {
		return nil
	}
	f := &rbachttpv3.RBAC{Rules: rules}
	if statPrefix {
		f.RulesStatPrefix = prefix
	}
	return []proto.Message{f}
}

// buildHTTPFilters is the HTTP filter list of a connection manager for in,
// in httpFilters' order, ending with the router.
func buildHTTPFilters(in httpFilterInput) []*hcmv3.HttpFilter {
	var out []*hcmv3.HttpFilter
	for _, f := range httpFilters {
		for _, cfg := range f.build(&in) {
			out = append(out, &hcmv3.HttpFilter{Name: f.name, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(cfg)}})
		}
	}
	return out
}

// HTTPFilterConfigTypes are the full names of the typed_config messages of
// every HTTP filter the translator may emit, in their order (with repeats:
// the RBAC filter appears twice, Deny then Allow). For the simulator's
// completeness test.
func HTTPFilterConfigTypes() []string {
	out := make([]string, len(httpFilters))
	for i, f := range httpFilters {
		out[i] = string(proto.MessageName(f.config))
	}
	return out
}
