// Package simulate follows a request through Envoy resources the way Envoy
// matches it — listener, filter chain, HTTP connection manager, virtual host,
// route, cluster, endpoint on the client; filter chain, TLS, RBAC and route
// on the server — so tests can assert behaviour ("the request from bar is
// denied") instead of configuration shapes. Each matching rule cites the
// Envoy documentation it mirrors. It understands the subset of Envoy the
// translator emits and reports anything else as an error rather than
// guessing.
package simulate

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	healthcheckv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	localratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/local_ratelimit/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/trellis-mesh/trellis/pkg/translate"
)

// Request is a connection or HTTP request a workload makes.
type Request struct {
	// DestIP and DestPort are what the application dialled (the original
	// destination iptables preserved).
	DestIP   string
	DestPort uint32
	// HTTP says the application speaks HTTP on the connection; otherwise it
	// is opaque TCP (or TLS with SNI set).
	HTTP bool
	// SNI of a TLS ClientHello the application sends itself.
	SNI string

	Host    string
	Path    string // with query string, e.g. "/a?b=c"
	Method  string
	Headers map[string]string
}

// Outcome of a simulated request.
type Outcome string

const (
	// Forwarded: the request reached an endpoint (or the original destination).
	Forwarded Outcome = "Forwarded"
	// Refused: no filter chain or a cluster without endpoints; the connection is closed.
	Refused Outcome = "Refused"
	// Responded: the proxy answered itself (direct response, e.g. 502 or 500).
	Responded Outcome = "Responded"
	// Redirected: the proxy answered with a redirect.
	Redirected Outcome = "Redirected"
	// Denied: the server's RBAC denied the request (HTTP 403 or connection closed).
	Denied Outcome = "Denied"
	// HandshakeFailed: the server required a client certificate the client did not present.
	HandshakeFailed Outcome = "HandshakeFailed"
)

// Result describes what Envoy did.
type Result struct {
	Outcome Outcome
	// Chain is the name of the outbound filter chain that matched.
	Chain string
	// VirtualHost and Route that matched (HTTP).
	VirtualHost string
	Route       *routev3.Route
	// Clusters the route may pick with their weights (one entry with weight 1 for a plain cluster).
	Clusters map[string]uint32
	// Cluster picked, and Endpoint "ip:port" picked from it.
	Cluster  string
	Endpoint string
	// MTLS says the client originated mutual TLS to the endpoint.
	MTLS bool
	// SANs are the server identities the client accepts (with MTLS).
	SANs []string
	// Status for Responded (direct response) and Denied (403 over HTTP).
	Status uint32
	// Redirect for Redirected.
	Redirect *routev3.RedirectAction

	// Server side, when the request reached a meshed server.
	Server *InboundResult
}

// InboundResult is what the server's inbound listener did.
type InboundResult struct {
	Outcome Outcome
	Chain   string
	// Peer is the client identity the server saw (URI SAN), "" for plaintext.
	Peer string
	// DeniedBy names the RBAC policy set that denied ("deny" or "allow").
	DeniedBy string
	// Policy is the RBAC policy that decided: the Deny policy that matched,
	// or the Allow policy that let the request through ("" when no policy
	// matched). Trellis names them <namespace>/<AccessPolicy>/rules/<i>.
	Policy string
	// Filters are the HTTP filters the request passed, in order.
	Filters []string
	Cluster string
}

// Proxy is a proxy's resources and identity.
type Proxy struct {
	Resources *translate.Resources
	// ID is the SPIFFE ID of the workload certificate it presents.
	ID string
	// IP of the pod.
	IP string
}

// Mesh resolves endpoint addresses to the proxies serving them.
type Mesh map[string]*Proxy

// Simulator sends requests from one proxy; Rand picks weighted clusters and
// endpoints (a fixed seed keeps tests reproducible).
type Simulator struct {
	Mesh Mesh
	Rand *rand.Rand
	// OnDemand resolves the clusters a proxy discovers on demand (the
	// control plane's side of ODCDS, e.g. translate.PodIPCluster).
	OnDemand func(name string) (*clusterv3.Cluster, bool)
}

// New returns a simulator over the proxies, keyed by pod IP.
func New(seed uint64, proxies ...*Proxy) *Simulator {
	m := Mesh{}
	for _, p := range proxies {
		m[p.IP] = p
	}
	return &Simulator{Mesh: m, Rand: rand.New(rand.NewPCG(seed, seed))}
}

func listener(r *translate.Resources, name string) (*listenerv3.Listener, error) {
	for _, l := range r.Listeners {
		if l.Name == name {
			return l, nil
		}
	}
	return nil, fmt.Errorf("no listener %q", name)
}

// Send follows req from client's outbound listener to an endpoint and, when
// the endpoint is a proxy the simulator knows, through its inbound listener.
func (s *Simulator) Send(client *Proxy, req Request) (*Result, error) {
	l, err := listener(client.Resources, translate.OutboundListenerName)
	if err != nil {
		return nil, err
	}
	fc, err := matchFilterChain(l, req.DestIP, req.DestPort, req.SNI, transportOf(req))
	if err != nil {
		return nil, err
	}
	res := &Result{}
	if fc == nil {
		res.Outcome = Refused
		return res, nil
	}
	res.Chain = fc.Name
	term, err := terminalFilter(fc)
	if err != nil {
		return nil, err
	}
	switch cfg := term.(type) {
	case *tcpproxyv3.TcpProxy:
		res.Clusters = map[string]uint32{cfg.GetCluster(): 1}
		res.Cluster = cfg.GetCluster()
		if cfg.GetOnDemand() != nil {
			// The pod-IP chains: the cluster is named after the original
			// destination and discovered from the control plane.
			if s.OnDemand == nil {
				return nil, fmt.Errorf("chain %q discovers its cluster on demand; set Simulator.OnDemand", fc.Name)
			}
			name := translate.PodIPClusterName(netip.AddrPortFrom(netip.MustParseAddr(req.DestIP), uint16(req.DestPort)))
			res.Clusters, res.Cluster = map[string]uint32{name: 1}, name
			c, ok := s.OnDemand(name)
			if !ok {
				res.Outcome = Refused // no such cluster: Envoy closes the connection
				return res, nil
			}
			return s.forward(client, req, res, c)
		}
	case *hcmv3.HttpConnectionManager:
		if !req.HTTP {
			return nil, fmt.Errorf("chain %q is HTTP but the request is not", fc.Name)
		}
		rc, err := routeConfig(client.Resources, cfg)
		if err != nil {
			return nil, err
		}
		vh, route := matchRoute(rc, req)
		if route == nil {
			res.Outcome, res.Status = Responded, 404 // Envoy: no route matched
			return res, nil
		}
		res.VirtualHost, res.Route = vh.Name, route
		switch a := route.Action.(type) {
		case *routev3.Route_DirectResponse:
			res.Outcome, res.Status = Responded, a.DirectResponse.Status
			return res, nil
		case *routev3.Route_Redirect:
			res.Outcome, res.Redirect = Redirected, a.Redirect
			return res, nil
		case *routev3.Route_Route:
			res.Clusters = clustersOf(a.Route)
			res.Cluster = s.pick(res.Clusters)
		default:
			return nil, fmt.Errorf("route %q: unsupported action %T", route.Name, route.Action)
		}
	default:
		return nil, fmt.Errorf("chain %q: unsupported terminal filter %T", fc.Name, term)
	}
	return s.forward(client, req, res, nil)
}

func transportOf(req Request) string {
	if req.SNI != "" {
		return "tls"
	}
	return "raw_buffer"
}

func clustersOf(a *routev3.RouteAction) map[string]uint32 {
	if c := a.GetCluster(); c != "" {
		return map[string]uint32{c: 1}
	}
	out := map[string]uint32{}
	for _, wc := range a.GetWeightedClusters().GetClusters() {
		out[wc.Name] += wc.GetWeight().GetValue()
	}
	return out
}

// pick chooses a cluster in proportion to its weight (Envoy's weighted
// clusters, https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/route/v3/route_components.proto#config-route-v3-weightedcluster).
func (s *Simulator) pick(weights map[string]uint32) string {
	names := make([]string, 0, len(weights))
	total := uint32(0)
	for n, w := range weights {
		names = append(names, n)
		total += w
	}
	slices.Sort(names)
	if total == 0 {
		return ""
	}
	x := s.Rand.Uint32N(total)
	for _, n := range names {
		if x < weights[n] {
			return n
		}
		x -= weights[n]
	}
	return names[len(names)-1]
}

// forward connects to an endpoint of res.Cluster and, for a known server
// proxy, runs its inbound side.
func (s *Simulator) forward(client *Proxy, req Request, res *Result, c *clusterv3.Cluster) (*Result, error) {
	if c == nil {
		c = findCluster(client.Resources, res.Cluster)
	}
	if c == nil {
		return nil, fmt.Errorf("cluster %q not found", res.Cluster)
	}
	var ep *endpointv3.LbEndpoint
	var tlsCtx *tlsv3.UpstreamTlsContext
	switch c.GetType() {
	case clusterv3.Cluster_ORIGINAL_DST:
		res.Endpoint = netip.AddrPortFrom(netip.MustParseAddr(req.DestIP), uint16(req.DestPort)).String()
		if ts := c.GetTransportSocket(); ts != nil {
			tlsCtx = &tlsv3.UpstreamTlsContext{}
			if err := ts.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
				return nil, err
			}
		}
	case clusterv3.Cluster_EDS:
		cla := findCLA(client.Resources, c.GetEdsClusterConfig().GetServiceName())
		var eps []*endpointv3.LbEndpoint
		for _, l := range cla.GetEndpoints() {
			if l.Priority == 0 {
				eps = append(eps, l.LbEndpoints...)
			}
		}
		if len(eps) == 0 {
			res.Outcome, res.Status = Responded, 503 // no healthy upstream
			return res, nil
		}
		ep = eps[s.Rand.IntN(len(eps))]
		sa := ep.GetEndpoint().GetAddress().GetSocketAddress()
		res.Endpoint = netip.AddrPortFrom(netip.MustParseAddr(sa.Address), uint16(sa.GetPortValue())).String()
		// Transport socket matches are tried in order against the endpoint's
		// envoy.transport_socket_match metadata; the cluster's own transport
		// socket (plaintext when unset) is the fallback
		// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/cluster/v3/cluster.proto#config-cluster-v3-cluster-transportsocketmatch).
		md := ep.GetMetadata().GetFilterMetadata()["envoy.transport_socket_match"].AsMap()
		for _, m := range c.TransportSocketMatches {
			ok := true
			for k, v := range m.GetMatch().AsMap() {
				if md[k] != v {
					ok = false
				}
			}
			if ok {
				tlsCtx = &tlsv3.UpstreamTlsContext{}
				if err := m.TransportSocket.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
					return nil, err
				}
				break
			}
		}
	case clusterv3.Cluster_STATIC:
		if len(c.GetLoadAssignment().GetEndpoints()) == 0 {
			res.Outcome = Refused // BlackHoleCluster
			if req.HTTP {
				res.Outcome, res.Status = Responded, 503
			}
			return res, nil
		}
		eps := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()
		if len(eps) != 1 {
			return nil, fmt.Errorf("static cluster %q: %d endpoints, only one is simulated", c.Name, len(eps))
		}
		sa := eps[0].GetEndpoint().GetAddress().GetSocketAddress()
		res.Endpoint = netip.AddrPortFrom(netip.MustParseAddr(sa.Address), uint16(sa.GetPortValue())).String()
		if ts := c.GetTransportSocket(); ts != nil {
			tlsCtx = &tlsv3.UpstreamTlsContext{}
			if err := ts.GetTypedConfig().UnmarshalTo(tlsCtx); err != nil {
				return nil, err
			}
		}
	default:
		res.Outcome = Forwarded // DNS clusters: leaves the mesh
		return res, nil
	}
	res.MTLS = tlsCtx != nil
	for _, m := range tlsCtx.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		res.SANs = append(res.SANs, m.GetMatcher().GetExact())
	}
	res.Outcome = Forwarded
	host, _, _ := strings.Cut(res.Endpoint, ":")
	if ap, err := netip.ParseAddrPort(res.Endpoint); err == nil {
		host = ap.Addr().String()
	}
	server := s.Mesh[host]
	if server == nil {
		return res, nil
	}
	peer := ""
	if res.MTLS {
		peer = client.ID
		if sans := tlsCtx.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames(); len(sans) > 0 {
			ok := false
			for _, m := range sans {
				if matchString(m.GetMatcher(), server.ID) {
					ok = true
				}
			}
			if !ok {
				return nil, fmt.Errorf("client rejects server certificate %s: not among %d expected SANs", server.ID, len(sans))
			}
		}
	}
	port := uint32(0)
	if ap, err := netip.ParseAddrPort(res.Endpoint); err == nil {
		port = uint32(ap.Port())
	}
	in, err := Inbound(server, InboundRequest{DestPort: port, TLS: res.MTLS, Peer: peer, HTTP: req.HTTP, Path: req.Path, Method: req.Method, Headers: req.Headers})
	if err != nil {
		return nil, err
	}
	res.Server = in
	if in.Outcome != Forwarded {
		res.Outcome = in.Outcome
		if in.Outcome == Denied && req.HTTP {
			res.Status = 403
		}
	}
	return res, nil
}

func findCluster(r *translate.Resources, name string) *clusterv3.Cluster {
	for _, c := range r.Clusters {
		if c.Name == name {
			return c
		}
	}
	return nil
}

func findCLA(r *translate.Resources, name string) *endpointv3.ClusterLoadAssignment {
	for _, e := range r.Endpoints {
		if e.ClusterName == name {
			return e
		}
	}
	return nil
}

// InboundRequest reaches a server proxy's inbound listener.
type InboundRequest struct {
	DestPort uint32
	// TLS: the client speaks TLS; Peer is the URI SAN of its certificate
	// ("" means it presents none).
	TLS  bool
	Peer string
	HTTP bool

	Path    string
	Method  string
	Headers map[string]string
}

// Inbound follows a connection through the server's inbound listener.
func Inbound(server *Proxy, req InboundRequest) (*InboundResult, error) {
	l, err := listener(server.Resources, translate.InboundListenerName)
	if err != nil {
		return nil, err
	}
	transport := "raw_buffer"
	if req.TLS {
		transport = "tls"
	}
	fc, err := matchFilterChain(l, server.IP, req.DestPort, "", transport)
	if err != nil {
		return nil, err
	}
	out := &InboundResult{}
	if fc == nil || fc == l.DefaultFilterChain {
		out.Outcome = Refused
		return out, nil
	}
	out.Chain = fc.Name
	if ts := fc.GetTransportSocket(); ts != nil {
		d := &tlsv3.DownstreamTlsContext{}
		if err := ts.GetTypedConfig().UnmarshalTo(d); err != nil {
			return nil, err
		}
		if d.GetRequireClientCertificate().GetValue() && req.Peer == "" {
			out.Outcome = HandshakeFailed
			return out, nil
		}
		out.Peer = req.Peer
	}
	for _, f := range fc.Filters {
		msg, err := f.GetTypedConfig().UnmarshalNew()
		if err != nil {
			return nil, err
		}
		switch cfg := msg.(type) {
		case *rbacnetv3.RBAC:
			allowed, policy, err := rbacAllows(cfg.GetRules(), out.Peer, req, false)
			if err != nil {
				return nil, err
			}
			if cfg.GetRules().GetAction() == rbacv3.RBAC_ALLOW || !allowed {
				out.Policy = policy
			}
			if !allowed {
				out.Outcome, out.DeniedBy = Denied, strings.ToLower(cfg.GetRules().GetAction().String())
				return out, nil
			}
		case *tcpproxyv3.TcpProxy:
			out.Outcome, out.Cluster = Forwarded, cfg.GetCluster()
			if cfg.GetCluster() == translate.BlackHoleCluster {
				out.Outcome = Refused
			}
			return out, nil
		case *hcmv3.HttpConnectionManager:
			return inboundHTTP(cfg, out, req)
		default:
			return nil, fmt.Errorf("inbound chain %q: unsupported filter %T", fc.Name, msg)
		}
	}
	return nil, fmt.Errorf("inbound chain %q has no terminal filter", fc.Name)
}

// inboundHTTP runs the HTTP filters in order, each by its handler in
// httpFilterSims: the first RBAC filter that denies ends the request with
// 403 (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/rbac_filter).
func inboundHTTP(h *hcmv3.HttpConnectionManager, out *InboundResult, req InboundRequest) (*InboundResult, error) {
	for _, f := range h.HttpFilters {
		msg, err := f.GetTypedConfig().UnmarshalNew()
		if err != nil {
			return nil, err
		}
		out.Filters = append(out.Filters, f.Name)
		sim, ok := httpFilterSims[proto.MessageName(msg)]
		if !ok {
			return nil, fmt.Errorf("unsupported HTTP filter %T", msg)
		}
		done, err := sim(h, msg, out, req)
		if err != nil {
			return nil, err
		}
		if done {
			return out, nil
		}
	}
	return nil, errors.New("HTTP filters without a router")
}

// httpFilterSim applies one HTTP filter to an inbound request; done ends
// the filter chain (the request was answered, denied or forwarded).
type httpFilterSim func(h *hcmv3.HttpConnectionManager, cfg proto.Message, out *InboundResult, req InboundRequest) (done bool, err error)

// httpFilterSims has a handler for every filter config type the translator
// emits (translate.HTTPFilterConfigTypes; TestSimulatorKnowsEveryHTTPFilter).
var httpFilterSims = map[protoreflect.FullName]httpFilterSim{
	proto.MessageName(&rbachttpv3.RBAC{}): func(_ *hcmv3.HttpConnectionManager, m proto.Message, out *InboundResult, req InboundRequest) (bool, error) {
		cfg := m.(*rbachttpv3.RBAC)
		allowed, policy, err := rbacAllows(cfg.GetRules(), out.Peer, req, true)
		if err != nil {
			return false, err
		}
		if cfg.GetRules().GetAction() == rbacv3.RBAC_ALLOW || !allowed {
			out.Policy = policy
		}
		if !allowed {
			out.Outcome, out.DeniedBy = Denied, strings.ToLower(cfg.GetRules().GetAction().String())
			return true, nil
		}
		return false, nil
	},
	// Recorded in Filters; their effect is probabilistic or time-based.
	proto.MessageName(&localratelimitv3.LocalRateLimit{}): passThrough,
	proto.MessageName(&faultv3.HTTPFault{}):               passThrough,
	// A health check (pass_through_mode false) answers the requests its
	// headers match itself.
	proto.MessageName(&healthcheckv3.HealthCheck{}): func(_ *hcmv3.HttpConnectionManager, m proto.Message, out *InboundResult, req InboundRequest) (bool, error) {
		for _, hm := range m.(*healthcheckv3.HealthCheck).GetHeaders() {
			if hm.GetName() != ":path" || hm.GetStringMatch().GetExact() != req.Path {
				return false, nil
			}
		}
		out.Outcome = Responded
		return true, nil
	},
	proto.MessageName(&routerv3.Router{}): func(h *hcmv3.HttpConnectionManager, _ proto.Message, out *InboundResult, req InboundRequest) (bool, error) {
		rc := h.GetRouteConfig()
		if rc == nil {
			return false, errors.New("inbound HTTP connection manager without inline routes")
		}
		_, route := matchRoute(rc, Request{Path: req.Path, Method: req.Method, Headers: req.Headers, HTTP: true, Host: "inbound"})
		if route == nil {
			out.Outcome = Responded
			return true, nil
		}
		out.Outcome, out.Cluster = Forwarded, route.GetRoute().GetCluster()
		return true, nil
	},
}

func passThrough(*hcmv3.HttpConnectionManager, proto.Message, *InboundResult, InboundRequest) (bool, error) {
	return false, nil
}

// HTTPFilterConfigTypes are the filter config types the simulator handles.
func HTTPFilterConfigTypes() map[string]bool {
	out := map[string]bool{}
	for n := range httpFilterSims {
		out[string(n)] = true
	}
	return out
}

func terminalFilter(fc *listenerv3.FilterChain) (proto.Message, error) {
	if len(fc.Filters) == 0 {
		return nil, fmt.Errorf("chain %q has no filters", fc.Name)
	}
	return fc.Filters[len(fc.Filters)-1].GetTypedConfig().UnmarshalNew()
}

func routeConfig(r *translate.Resources, h *hcmv3.HttpConnectionManager) (*routev3.RouteConfiguration, error) {
	if rc := h.GetRouteConfig(); rc != nil {
		return rc, nil
	}
	name := h.GetRds().GetRouteConfigName()
	for _, rc := range r.Routes {
		if rc.Name == name {
			return rc, nil
		}
	}
	return nil, fmt.Errorf("RDS %q not found", name)
}

// matchFilterChain selects a filter chain the way Envoy does: the most
// specific destination port (an exact port beats no port), then the longest
// destination IP prefix, then server name, then transport protocol; no match
// uses the default filter chain
// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/listener/v3/listener_components.proto#config-listener-v3-filterchainmatch).
func matchFilterChain(l *listenerv3.Listener, ip string, port uint32, sni, transport string) (*listenerv3.FilterChain, error) {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return nil, fmt.Errorf("destination %q: %w", ip, err)
	}
	cands := l.FilterChains
	// 1. destination port
	var withPort, noPort []*listenerv3.FilterChain
	for _, fc := range cands {
		m := fc.GetFilterChainMatch()
		switch {
		case m.GetDestinationPort() == nil:
			noPort = append(noPort, fc)
		case m.GetDestinationPort().GetValue() == port:
			withPort = append(withPort, fc)
		}
	}
	cands = withPort
	if len(cands) == 0 {
		cands = noPort
	}
	// 2. destination IP: the longest matching prefix; chains without prefixes match any
	best, bestLen := []*listenerv3.FilterChain{}, -1
	for _, fc := range cands {
		ranges := fc.GetFilterChainMatch().GetPrefixRanges()
		if len(ranges) == 0 {
			if bestLen < 0 {
				best = append(best, fc)
			}
			continue
		}
		for _, r := range ranges {
			p, err := netip.ParsePrefix(fmt.Sprintf("%s/%d", r.AddressPrefix, r.GetPrefixLen().GetValue()))
			if err != nil {
				return nil, err
			}
			if p.Contains(addr) && p.Bits() >= bestLen {
				if p.Bits() > bestLen {
					best, bestLen = nil, p.Bits()
				}
				best = append(best, fc)
			}
		}
	}
	if bestLen < 0 {
		// only prefix-less chains (if any) remain
		var any []*listenerv3.FilterChain
		for _, fc := range best {
			if len(fc.GetFilterChainMatch().GetPrefixRanges()) == 0 {
				any = append(any, fc)
			}
		}
		best = any
	}
	cands = best
	// 3. server names
	var named, unnamed []*listenerv3.FilterChain
	for _, fc := range cands {
		names := fc.GetFilterChainMatch().GetServerNames()
		switch {
		case len(names) == 0:
			unnamed = append(unnamed, fc)
		case sni != "" && slices.Contains(names, sni):
			named = append(named, fc)
		}
	}
	cands = named
	if len(cands) == 0 {
		cands = unnamed
	}
	// 4. transport protocol
	var exact, blank []*listenerv3.FilterChain
	for _, fc := range cands {
		switch fc.GetFilterChainMatch().GetTransportProtocol() {
		case "":
			blank = append(blank, fc)
		case transport:
			exact = append(exact, fc)
		}
	}
	cands = exact
	if len(cands) == 0 {
		cands = blank
	}
	switch len(cands) {
	case 0:
		return l.DefaultFilterChain, nil
	case 1:
		return cands[0], nil
	}
	return nil, fmt.Errorf("listener %q: %d filter chains match %s:%d", l.Name, len(cands), ip, port)
}

// matchRoute picks the virtual host by the Host header — exact domains
// first, then the longest suffix and prefix wildcards, then "*" — and the
// first route whose match holds
// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/route/v3/route_components.proto#config-route-v3-virtualhost).
func matchRoute(rc *routev3.RouteConfiguration, req Request) (*routev3.VirtualHost, *routev3.Route) {
	host := strings.ToLower(req.Host)
	var vh, star *routev3.VirtualHost
	for _, v := range rc.VirtualHosts {
		for _, d := range v.Domains {
			switch {
			case strings.EqualFold(d, host):
				vh = v
			case d == "*":
				star = v
			}
		}
		if vh != nil {
			break
		}
	}
	if vh == nil {
		vh = star
	}
	if vh == nil {
		return nil, nil
	}
	for _, r := range vh.Routes {
		if routeMatches(r.Match, req) {
			return vh, r
		}
	}
	return vh, nil
}

func routeMatches(m *routev3.RouteMatch, req Request) bool {
	path, query, _ := strings.Cut(req.Path, "?")
	switch p := m.PathSpecifier.(type) {
	case *routev3.RouteMatch_Prefix:
		if !strings.HasPrefix(path, p.Prefix) {
			return false
		}
	case *routev3.RouteMatch_Path:
		if path != p.Path {
			return false
		}
	case *routev3.RouteMatch_PathSeparatedPrefix:
		// the prefix, followed by the end of the path or "/"
		if path != p.PathSeparatedPrefix && !strings.HasPrefix(path, p.PathSeparatedPrefix+"/") {
			return false
		}
	case *routev3.RouteMatch_SafeRegex:
		if !fullMatch(p.SafeRegex.Regex, path) {
			return false
		}
	default:
		return false
	}
	for _, h := range m.Headers {
		v, ok := header(req, h.Name)
		if !ok || !matchString(h.GetStringMatch(), v) {
			return false
		}
	}
	if len(m.QueryParameters) > 0 {
		params := map[string]string{}
		for _, kv := range strings.Split(query, "&") {
			k, v, _ := strings.Cut(kv, "=")
			params[k] = v
		}
		for _, q := range m.QueryParameters {
			v, ok := params[q.Name]
			if !ok || !matchString(q.GetStringMatch(), v) {
				return false
			}
		}
	}
	if m.Grpc != nil {
		ct, _ := header(req, "content-type")
		if !strings.HasPrefix(ct, "application/grpc") {
			return false
		}
	}
	return true
}

func header(req Request, name string) (string, bool) {
	switch name {
	case ":method":
		return req.Method, req.Method != ""
	case ":path":
		return req.Path, true
	case ":authority":
		return req.Host, true
	}
	for k, v := range req.Headers {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return "", false
}

func fullMatch(expr, s string) bool {
	re, err := regexp.Compile("^(?:" + expr + ")$")
	return err == nil && re.MatchString(s)
}

func matchString(m *matcherv3.StringMatcher, v string) bool {
	if m == nil {
		return true
	}
	if m.IgnoreCase {
		v = strings.ToLower(v)
	}
	lc := func(s string) string {
		if m.IgnoreCase {
			return strings.ToLower(s)
		}
		return s
	}
	switch p := m.MatchPattern.(type) {
	case *matcherv3.StringMatcher_Exact:
		return v == lc(p.Exact)
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(v, lc(p.Prefix))
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(v, lc(p.Suffix))
	case *matcherv3.StringMatcher_Contains:
		return strings.Contains(v, lc(p.Contains))
	case *matcherv3.StringMatcher_SafeRegex:
		return fullMatch(p.SafeRegex.Regex, v)
	}
	return false
}

// rbacAllows evaluates an RBAC rule set: a policy matches when one of its
// permissions and one of its principals match; ALLOW lets through requests
// some policy matches, DENY those no policy matches
// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/rbac/v3/rbac.proto).
// rbacAllows evaluates an RBAC filter's rules; policy is the first policy
// (by name) that matched.
func rbacAllows(r *rbacv3.RBAC, peer string, req InboundRequest, http bool) (allowed bool, policy string, err error) {
	names := make([]string, 0, len(r.GetPolicies()))
	for n := range r.GetPolicies() {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p := r.GetPolicies()[n]
		perm, err := anyOf(p.Permissions, func(x *rbacv3.Permission) (bool, error) { return permission(x, req, http) })
		if err != nil {
			return false, "", err
		}
		prin, err := anyOf(p.Principals, func(x *rbacv3.Principal) (bool, error) { return principal(x, peer) })
		if err != nil {
			return false, "", err
		}
		if perm && prin {
			policy = n
			break
		}
	}
	if r.GetAction() == rbacv3.RBAC_DENY {
		return policy == "", policy, nil
	}
	return policy != "", policy, nil
}

func anyOf[T any](xs []T, f func(T) (bool, error)) (bool, error) {
	for _, x := range xs {
		ok, err := f(x)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

func permission(p *rbacv3.Permission, req InboundRequest, http bool) (bool, error) {
	switch r := p.Rule.(type) {
	case *rbacv3.Permission_Any:
		return r.Any, nil
	case *rbacv3.Permission_AndRules:
		for _, x := range r.AndRules.Rules {
			ok, err := permission(x, req, http)
			if err != nil || !ok {
				return false, err
			}
		}
		return true, nil
	case *rbacv3.Permission_OrRules:
		return anyOf(r.OrRules.Rules, func(x *rbacv3.Permission) (bool, error) { return permission(x, req, http) })
	case *rbacv3.Permission_NotRule:
		ok, err := permission(r.NotRule, req, http)
		return !ok, err
	case *rbacv3.Permission_DestinationPort:
		return r.DestinationPort == req.DestPort, nil
	case *rbacv3.Permission_Header:
		if !http {
			return false, nil
		}
		v, ok := header(Request{Method: req.Method, Path: req.Path, Headers: req.Headers}, r.Header.Name)
		return ok && matchString(r.Header.GetStringMatch(), v), nil
	case *rbacv3.Permission_UrlPath:
		if !http {
			return false, nil
		}
		path, _, _ := strings.Cut(req.Path, "?")
		return matchString(r.UrlPath.GetPath(), path), nil
	}
	return false, fmt.Errorf("RBAC permission %T not simulated", p.Rule)
}

func principal(p *rbacv3.Principal, peer string) (bool, error) {
	switch r := p.Identifier.(type) {
	case *rbacv3.Principal_Any:
		return r.Any, nil
	case *rbacv3.Principal_Authenticated_:
		if peer == "" {
			return false, nil
		}
		return r.Authenticated.GetPrincipalName() == nil || matchString(r.Authenticated.GetPrincipalName(), peer), nil
	case *rbacv3.Principal_OrIds:
		return anyOf(r.OrIds.Ids, func(x *rbacv3.Principal) (bool, error) { return principal(x, peer) })
	case *rbacv3.Principal_AndIds:
		for _, x := range r.AndIds.Ids {
			ok, err := principal(x, peer)
			if err != nil || !ok {
				return false, err
			}
		}
		return true, nil
	}
	return false, fmt.Errorf("RBAC principal %T not simulated", p.Identifier)
}
