package translate

import (
	"cmp"
	"fmt"
	"slices"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	localratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/local_ratelimit/v3"
	origdstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

func sortStrings(s []string) { sort.Strings(s) }

// inboundPort is one application port of the proxy's workload and the
// Service ports that reach it.
type inboundPort struct {
	port     int32
	protocol model.Protocol
	services []*model.Service
	svcPorts map[*model.Service][]int32
}

// inboundPorts finds the workload's ports from the Services whose endpoints
// list the pod. When Services disagree on a port's protocol, the first
// Service (by namespace/name) decides.
func (t *translator) inboundPorts() []*inboundPort {
	byPort := map[int32]*inboundPort{}
	for _, svc := range t.mesh.Services {
		if svc.Namespace != t.proxy.Namespace {
			continue
		}
		for _, sp := range svc.Ports {
			for _, e := range svc.Endpoints[sp.Port] {
				if e.Pod != t.proxy.Name && (e.Pod != "" || !slices.Contains(t.proxy.IPs, e.IP)) {
					continue
				}
				ip := byPort[e.Port]
				if ip == nil {
					ip = &inboundPort{port: e.Port, protocol: sp.Protocol, svcPorts: map[*model.Service][]int32{}}
					byPort[e.Port] = ip
				}
				if !slices.Contains(ip.services, svc) {
					ip.services = append(ip.services, svc)
				}
				if !slices.Contains(ip.svcPorts[svc], sp.Port) {
					ip.svcPorts[svc] = append(ip.svcPorts[svc], sp.Port)
				}
				break
			}
		}
	}
	out := make([]*inboundPort, 0, len(byPort))
	for _, p := range byPort {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *inboundPort) int { return cmp.Compare(a.port, b.port) })
	return out
}

// inboundListener accepts traffic iptables redirects to 15006. Each
// application port gets a filter chain for mutual TLS (client certificate
// required, verified against the trust bundle) and, in Permissive mode
// only, one for plaintext; the tls_inspector tells them apart. In Strict
// mode a plaintext connection finds no chain and is closed.
func (t *translator) inboundListener() *listenerv3.Listener {
	l := &listenerv3.Listener{
		Name:    InboundListenerName,
		Address: socketAddress("0.0.0.0", InboundPort),
		ListenerFilters: []*listenerv3.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&origdstv3.OriginalDst{})}},
			{Name: "envoy.filters.listener.tls_inspector", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})}},
		},
		UseOriginalDst:                   wrapperspb.Bool(true),
		ContinueOnListenerFiltersTimeout: true,
		TrafficDirection:                 corev3.TrafficDirection_INBOUND,
		// Ports no Service declares, and plaintext in Strict mode, are closed.
		DefaultFilterChain: &listenerv3.FilterChain{Name: BlackHoleCluster, Filters: []*listenerv3.Filter{t.tcpProxy("inbound-blackhole", BlackHoleCluster)}},
	}
	for _, ip := range t.inboundPorts() {
		cluster := InboundClusterName(ip.port)
		c := originalDstCluster(cluster)
		// From an address trellis-init lets through to the application, so
		// that the sidecar's own calls to its pod IP can be sent through the
		// inbound side without looping (pkg/iptables).
		c.UpstreamBindConfig = &corev3.BindConfig{
			SourceAddress:        &corev3.SocketAddress{Address: InboundBindIPv4, PortSpecifier: &corev3.SocketAddress_PortValue{}},
			ExtraSourceAddresses: []*corev3.ExtraSourceAddress{{Address: &corev3.SocketAddress{Address: InboundBindIPv6, PortSpecifier: &corev3.SocketAddress_PortValue{}}}},
		}
		if ip.protocol.IsHTTP2() {
			c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: http2Options()}
		}
		t.clusters[cluster] = c
		var alpn []string
		if ip.protocol.IsHTTP() {
			alpn = []string{"h2", "http/1.1"}
		}
		tls := &tlsv3.DownstreamTlsContext{
			CommonTlsContext:         t.commonTLS(nil, alpn),
			RequireClientCertificate: wrapperspb.Bool(true),
		}
		l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
			Name:             fmt.Sprintf("%s|mtls", cluster),
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(ip.port)), TransportProtocol: "tls"},
			TransportSocket:  &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(tls)}},
			Filters:          t.inboundFilters(ip, cluster),
		})
		if t.mesh.Settings.Permissive {
			l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
				Name:             fmt.Sprintf("%s|plaintext", cluster),
				FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(ip.port)), TransportProtocol: "raw_buffer"},
				Filters:          t.inboundFilters(ip, cluster),
			})
		}
	}
	return l
}

func (t *translator) inboundFilters(ip *inboundPort, cluster string) []*listenerv3.Filter {
	deny, allow := t.rbacPolicies(ip)
	if !ip.protocol.IsHTTP() {
		var fs []*listenerv3.Filter
		if deny != nil {
			fs = append(fs, &listenerv3.Filter{Name: "envoy.filters.network.rbac", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&rbacnetv3.RBAC{StatPrefix: cluster + ".deny", Rules: deny})}})
		}
		if allow != nil {
			fs = append(fs, &listenerv3.Filter{Name: "envoy.filters.network.rbac", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&rbacnetv3.RBAC{StatPrefix: cluster + ".allow", Rules: allow})}})
		}
		return append(fs, t.tcpProxy(cluster, cluster))
	}
	h := t.baseHCM(cluster, true)
	h.RouteSpecifier = &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
		Name: cluster,
		// Not validated against the clusters Envoy holds (as RDS routes
		// are not): over delta ADS the listener may arrive before its
		// cluster or after the cluster's removal (a pod losing its last
		// endpoint), and validation NACKs the whole listener — seen in the
		// Envoy scale-down e2e. A missing cluster answers 503 NC instead.
		ValidateClusters: wrapperspb.Bool(false),
		VirtualHosts: []*routev3.VirtualHost{{Name: cluster, Domains: []string{"*"}, Routes: []*routev3.Route{{
			Name:   "default",
			Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}, Timeout: noTimeout()}},
		}}}},
	}}
	in := httpFilterInput{deny: deny, allow: allow, rbacStatPrefixes: true}
	if p := t.inboundPolicy(ip); p != nil {
		if rl := p.RateLimit; rl != nil {
			in.rateLimit = &localratelimitv3.LocalRateLimit{
				StatPrefix:     "local_rate_limit",
				TokenBucket:    &typev3.TokenBucket{MaxTokens: rl.Requests, TokensPerFill: wrapperspb.UInt32(rl.Requests), FillInterval: dur(rl.Interval)},
				FilterEnabled:  &corev3.RuntimeFractionalPercent{DefaultValue: percent(100), RuntimeKey: "local_rate_limit_enabled"},
				FilterEnforced: &corev3.RuntimeFractionalPercent{DefaultValue: percent(100), RuntimeKey: "local_rate_limit_enforced"},
			}
		}
		in.fault = faultFilter(p.Fault)
	}
	h.HttpFilters = buildHTTPFilters(in)
	return []*listenerv3.Filter{hcmFilter(h)}
}

// inboundPolicy is the BackendPolicy of the first Service reaching the port.
func (t *translator) inboundPolicy(ip *inboundPort) *model.TrafficPolicy {
	for _, s := range ip.services {
		if s.Policy != nil {
			return s.Policy
		}
	}
	return nil
}

// rbacPolicies builds the DENY and ALLOW rule sets of an inbound port from
// the AccessPolicies of the Services reaching it. Deny is evaluated first;
// if any Allow policy applies, only requests matching one pass; with none,
// MeshConfig's defaultAccess decides (Deny: an ALLOW set with no policy).
// nil means no filter.
func (t *translator) rbacPolicies(ip *inboundPort) (deny, allow *rbacv3.RBAC) {
	denyPolicies := map[string]*rbacv3.Policy{}
	allowPolicies := map[string]*rbacv3.Policy{}
	anyAllow := false
	for _, svc := range ip.services {
		for _, ap := range svc.AccessPolicies {
			if !ap.Deny {
				anyAllow = true
			}
			for _, rule := range ap.Rules {
				p, ok := t.rbacPolicy(rule, ip, ip.svcPorts[svc])
				if !ok {
					continue
				}
				name := fmt.Sprintf("%s/%s/rules/%d", ap.Namespace, ap.Name, rule.Index)
				if ap.Deny {
					denyPolicies[name] = p
				} else {
					allowPolicies[name] = p
				}
			}
		}
	}
	if len(denyPolicies) > 0 {
		deny = &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: denyPolicies}
	}
	if anyAllow || t.mesh.Settings.DenyByDefault {
		allow = &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: allowPolicies}
	}
	return deny, allow
}

func anyPermission() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}
func anyPrincipal() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

// rbacPolicy translates one rule for one inbound port; ok is false when the
// rule can never match there (its operations name other ports, or paths and
// methods on a TCP port).
func (t *translator) rbacPolicy(rule model.AccessRule, ip *inboundPort, svcPorts []int32) (*rbacv3.Policy, bool) {
	p := &rbacv3.Policy{}
	for _, f := range rule.From {
		switch {
		case f.ID != "":
			p.Principals = append(p.Principals, authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: f.ID}}))
		case f.Authenticated:
			p.Principals = append(p.Principals, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{}}})
		case f.IDPrefix != "":
			p.Principals = append(p.Principals, authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: f.IDPrefix}}))
		}
	}
	if len(rule.From) == 0 {
		p.Principals = []*rbacv3.Principal{anyPrincipal()}
	}
	for _, op := range rule.To {
		if len(op.Ports) > 0 && !slices.ContainsFunc(svcPorts, func(sp int32) bool { return slices.Contains(op.Ports, sp) }) {
			continue // names only other ports of the Service
		}
		if !ip.protocol.IsHTTP() && (len(op.Paths) > 0 || len(op.Methods) > 0) {
			continue // paths and methods never match TCP
		}
		var and []*rbacv3.Permission
		if len(op.Paths) > 0 {
			var or []*rbacv3.Permission
			for _, pm := range op.Paths {
				or = append(or, pathPermissions(pm)...)
			}
			and = append(and, orPermission(or))
		}
		if len(op.Methods) > 0 {
			var or []*rbacv3.Permission
			for _, m := range op.Methods {
				or = append(or, &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
					Name: ":method", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: m}}},
				}}})
			}
			and = append(and, orPermission(or))
		}
		switch len(and) {
		case 0:
			p.Permissions = append(p.Permissions, anyPermission())
		case 1:
			p.Permissions = append(p.Permissions, and[0])
		default:
			p.Permissions = append(p.Permissions, &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: and}}})
		}
	}
	if len(rule.To) == 0 {
		p.Permissions = []*rbacv3.Permission{anyPermission()}
	}
	if len(p.Permissions) == 0 || len(p.Principals) == 0 {
		return nil, false
	}
	return p, true
}

func authenticated(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func orPermission(ps []*rbacv3.Permission) *rbacv3.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: ps}}}
}

// pathPermissions: Exact matches the path; PathPrefix matches whole
// segments, so "/api" is the path "/api" or a path starting "/api/".
func pathPermissions(pm model.PathMatch) []*rbacv3.Permission {
	urlPath := func(sm *matcherv3.StringMatcher) *rbacv3.Permission {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: sm}}}}
	}
	if pm.Type == model.MatchExact {
		return []*rbacv3.Permission{urlPath(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: pm.Value}})}
	}
	v := strings.TrimRight(pm.Value, "/")
	if v == "" {
		return []*rbacv3.Permission{anyPermission()}
	}
	return []*rbacv3.Permission{
		urlPath(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}),
		urlPath(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: v + "/"}}),
	}
}
