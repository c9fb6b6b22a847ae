package translate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	origdstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// outboundListener is the single listener iptables redirects outbound TCP to.
// Filter chains are chosen by Envoy's filter-chain match on the original
// destination (restored by the original_dst listener filter): destination
// port first, then the most specific destination IP prefix, then SNI
// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/listener/v3/listener_components.proto#config-listener-v3-filterchainmatch).
func (t *translator) outboundListener() *listenerv3.Listener {
	type chainKey struct {
		prefixes string
		port     uint32
		sni      string
	}
	seen := map[chainKey]string{}
	var chains []*listenerv3.FilterChain
	add := func(owner model.Ref, fc *listenerv3.FilterChain) {
		m := fc.FilterChainMatch
		k := chainKey{port: m.GetDestinationPort().GetValue()}
		for _, p := range m.PrefixRanges {
			k.prefixes += p.AddressPrefix + "/" + strconv.Itoa(int(p.PrefixLen.GetValue())) + ","
		}
		if len(m.ServerNames) > 0 {
			k.sni = m.ServerNames[0]
		}
		if prev, dup := seen[k]; dup {
			t.problem(owner, "", model.ReasonConflicted, model.ConditionAccepted,
				fmt.Sprintf("destination %s%s port %d is already claimed by %s", k.prefixes, k.sni, k.port, prev))
			return
		}
		seen[k] = fc.Name
		chains = append(chains, fc)
	}
	httpPorts := map[int32]bool{}

	for _, svc := range t.visibleServices() {
		ref := model.Ref{Kind: "Service", Namespace: svc.Namespace, Name: svc.Name}
		for i := range svc.Ports {
			port := &svc.Ports[i]
			if svc.Headless() {
				cluster := t.serviceCluster(svc, port)
				for _, e := range svc.Endpoints[port.Port] {
					pfx, err := hostPrefix(e.IP)
					if err != nil {
						continue
					}
					add(ref, &listenerv3.FilterChain{
						Name:             cluster + "|" + e.IP,
						FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: cidrs(pfx), DestinationPort: wrapperspb.UInt32(uint32(e.Port))},
						Filters:          []*listenerv3.Filter{t.tcpProxy(cluster, cluster)},
					})
				}
				continue
			}
			pfxs := clusterIPPrefixes(svc)
			if len(pfxs) == 0 {
				continue
			}
			cluster := t.serviceCluster(svc, port)
			fc := &listenerv3.FilterChain{
				Name:             cluster,
				FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: cidrs(pfxs...), DestinationPort: wrapperspb.UInt32(uint32(port.Port))},
			}
			if port.Protocol.IsHTTP() {
				rds := ServiceRouteName(svc.Hostname(), port.Port)
				fc.Filters = []*listenerv3.Filter{t.outboundHCM(rds, cluster)}
				t.routes[rds] = t.serviceRouteConfig(rds, svc, port)
			} else {
				fc.Filters = []*listenerv3.Filter{t.tcpProxy(cluster, cluster)}
			}
			add(ref, fc)
		}
	}

	// Services scoping leaves out: an HTTP call to one is answered 403
	// by the caller's own sidecar, naming the policies, instead of being
	// passed through to a server that resets it. No cluster, no endpoints;
	// one chain per port and set of Allow policies (a namespace's Services
	// usually share one), so a scoped proxy's listener stays small.
	type denial struct {
		port     int32
		policies []string
		pfxs     []netip.Prefix
	}
	var denials []*denial
	byGroup := map[string]*denial{}
	for _, svc := range t.deniedServices() {
		if svc.Headless() {
			continue
		}
		policies := allowPolicies(svc)
		for i := range svc.Ports {
			port := &svc.Ports[i]
			if !port.Protocol.IsHTTP() {
				continue
			}
			key := DeniedChainName(port.Port, policies)
			d := byGroup[key]
			if d == nil {
				d = &denial{port: port.Port, policies: policies}
				byGroup[key] = d
				denials = append(denials, d)
			}
			d.pfxs = append(d.pfxs, clusterIPPrefixes(svc)...)
		}
	}
	for _, d := range denials {
		if len(d.pfxs) == 0 {
			continue
		}
		name := DeniedChainName(d.port, d.policies)
		h := t.baseHCM(name, false)
		h.RouteSpecifier = &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{{
			Name: name, Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Name:  "denied",
				Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 403, Body: &corev3.DataSource{
					Specifier: &corev3.DataSource_InlineString{InlineString: t.denialMessage(d.policies, d.port) + "\n"},
				}}},
			}},
		}}}}
		h.HttpFilters = buildHTTPFilters(httpFilterInput{})
		chains = append(chains, &listenerv3.FilterChain{
			Name:             name,
			FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: cidrs(d.pfxs...), DestinationPort: wrapperspb.UInt32(uint32(d.port))},
			Filters:          []*listenerv3.Filter{hcmFilter(h)},
		})
	}

	needTLSInspector := false
	for _, es := range t.mesh.External {
		ref := model.Ref{Kind: "ExternalService", Namespace: es.Namespace, Name: es.Name}
		for _, p := range es.Ports {
			switch p.Protocol {
			case model.ExternalHTTP:
				for _, h := range es.Hosts {
					t.externalCluster(h, p)
				}
				httpPorts[p.Number] = true
				// Any destination IP on this port: the Host header picks the route.
				name := fmt.Sprintf("outbound|%d||external-http", p.Number)
				if _, dup := findChain(chains, name); !dup {
					add(ref, &listenerv3.FilterChain{
						Name:             name,
						FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(p.Number))},
						Filters:          []*listenerv3.Filter{t.outboundHCM(OutboundRouteName(p.Number), name)},
					})
				}
			case model.ExternalTLS:
				needTLSInspector = true
				for _, h := range es.Hosts {
					cluster := t.externalCluster(h, p)
					add(ref, &listenerv3.FilterChain{
						Name: cluster,
						FilterChainMatch: &listenerv3.FilterChainMatch{
							DestinationPort: wrapperspb.UInt32(uint32(p.Number)), ServerNames: []string{h}, TransportProtocol: "tls",
						},
						Filters: []*listenerv3.Filter{t.tcpProxy(cluster, cluster)},
					})
				}
			case model.ExternalTCP:
				if len(es.Addresses) == 0 {
					continue
				}
				name := fmt.Sprintf("outbound|%d||%s.%s.external", p.Number, es.Name, es.Namespace)
				if _, ok := t.clusters[name]; !ok {
					t.clusters[name] = originalDstCluster(name)
				}
				add(ref, &listenerv3.FilterChain{
					Name:             name,
					FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: cidrs(es.Addresses...), DestinationPort: wrapperspb.UInt32(uint32(p.Number))},
					Filters:          []*listenerv3.Filter{t.tcpProxy(name, name)},
				})
			}
		}
	}

	// Pod IPs last: an ExternalService claiming the same range and port
	// keeps it (more specific ranges win in Envoy anyway).
	for _, fc := range t.podIPChains(chains) {
		if _, dup := findChain(chains, fc.Name); !dup && !claimed(chains, fc.FilterChainMatch) {
			chains = append(chains, fc)
		}
	}

	for port := range httpPorts {
		t.routes[OutboundRouteName(port)] = t.outboundRouteConfig(port)
	}

	slices.SortFunc(chains, func(a, b *listenerv3.FilterChain) int { return cmp.Compare(a.Name, b.Name) })
	fallthroughCluster := PassthroughCluster
	if t.mesh.Settings.RegistryOnly {
		fallthroughCluster = BlackHoleCluster
	}
	l := &listenerv3.Listener{
		Name:           OutboundListenerName,
		Address:        socketAddress("0.0.0.0", OutboundPort),
		UseOriginalDst: wrapperspb.Bool(true),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       "envoy.filters.listener.original_dst",
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&origdstv3.OriginalDst{})},
		}},
		FilterChains: chains,
		DefaultFilterChain: &listenerv3.FilterChain{
			Name:    fallthroughCluster,
			Filters: []*listenerv3.Filter{t.tcpProxy(fallthroughCluster, fallthroughCluster)},
		},
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
	}
	if needTLSInspector {
		l.ListenerFilters = append(l.ListenerFilters, &listenerv3.ListenerFilter{
			Name:       "envoy.filters.listener.tls_inspector",
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})},
		})
		// Server-first protocols must not wait for a ClientHello forever.
		l.ContinueOnListenerFiltersTimeout = true
	}
	return l
}

func findChain(chains []*listenerv3.FilterChain, name string) (*listenerv3.FilterChain, bool) {
	for _, c := range chains {
		if c.Name == name {
			return c, true
		}
	}
	return nil, false
}

// claimed says whether a chain already matches exactly m's port, ranges and
// server names.
func claimed(chains []*listenerv3.FilterChain, m *listenerv3.FilterChainMatch) bool {
	for _, c := range chains {
		cm := c.FilterChainMatch
		if cm.GetDestinationPort().GetValue() == m.GetDestinationPort().GetValue() &&
			slices.EqualFunc(cm.PrefixRanges, m.PrefixRanges, func(a, b *corev3.CidrRange) bool {
				return a.AddressPrefix == b.AddressPrefix && a.PrefixLen.GetValue() == b.PrefixLen.GetValue()
			}) && slices.Equal(cm.ServerNames, m.ServerNames) {
			return true
		}
	}
	return false
}

func cidrs(ps ...netip.Prefix) []*corev3.CidrRange {
	out := make([]*corev3.CidrRange, 0, len(ps))
	for _, p := range ps {
		out = append(out, &corev3.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))})
	}
	return out
}

// visibleServices is the scoping rule: a proxy receives every Service in
// the mesh except those it provably may not call — a Service targeted by
// Allow AccessPolicies none of whose rules can match the proxy's identity,
// or, with defaultAccess Deny, a Service no Allow rule opens to it. Leaving
// them out is safe: the server side would deny the request anyway.
func (t *translator) visibleServices() []*model.Service {
	t.scope()
	return t.visible
}

// deniedServices are the Services visibleServices leaves out.
func (t *translator) deniedServices() []*model.Service {
	t.scope()
	return t.denied
}

// scope splits the mesh's Services into visible and denied, once.
func (t *translator) scope() {
	if t.visible != nil {
		return
	}
	t.visible = []*model.Service{}
	for _, svc := range t.mesh.Services {
		if t.mayCall(svc) {
			t.visible = append(t.visible, svc)
		} else {
			t.denied = append(t.denied, svc)
		}
	}
}

// clusterIPPrefixes are the Service's cluster IPs as host prefixes.
func clusterIPPrefixes(svc *model.Service) []netip.Prefix {
	var out []netip.Prefix
	for _, ip := range svc.ClusterIPs {
		if p, err := hostPrefix(ip); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// allowPolicies are the Allow AccessPolicies on the Service, as
// namespace/name.
func allowPolicies(svc *model.Service) []string {
	var allow []string
	for _, ap := range svc.AccessPolicies {
		if !ap.Deny {
			allow = append(allow, ap.Namespace+"/"+ap.Name)
		}
	}
	return allow
}

// denialMessage says why the proxy may not call a Service on the port:
// which Allow AccessPolicies leave it out, or the mesh's defaultAccess.
func (t *translator) denialMessage(allow []string, port int32) string {
	who := t.mesh.SPIFFEID(t.proxy.Namespace, t.proxy.ServiceAccount)
	switch len(allow) {
	case 0:
		return fmt.Sprintf("access denied by Trellis: MeshConfig defaultAccess is Deny and no Allow AccessPolicy lets %s call this Service on port %d", who, port)
	case 1:
		return fmt.Sprintf("access denied by Trellis: AccessPolicy %s allows calls to this Service on port %d only from the identities it lists, and %s is not one of them", allow[0], port, who)
	}
	return fmt.Sprintf("access denied by Trellis: AccessPolicies %s allow calls to this Service on port %d only from the identities they list, and %s is not one of them", strings.Join(allow, ", "), port, who)
}

func (t *translator) mayCall(svc *model.Service) bool {
	hasAllow := false
	id := t.mesh.SPIFFEID(t.proxy.Namespace, t.proxy.ServiceAccount)
	for _, ap := range svc.AccessPolicies {
		if ap.Deny {
			continue
		}
		hasAllow = true
		for _, r := range ap.Rules {
			if len(r.From) == 0 || slices.ContainsFunc(r.From, func(p model.Principal) bool { return p.Matches(id) }) {
				return true
			}
		}
	}
	if hasAllow {
		return false
	}
	return !t.mesh.Settings.DenyByDefault
}

func (t *translator) tcpProxy(statPrefix, cluster string) *listenerv3.Filter {
	tp := &tcpproxyv3.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
		AccessLog:        t.accessLogs(false),
	}
	return &listenerv3.Filter{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tp)}}
}

func (t *translator) outboundHCM(rdsName, statPrefix string) *listenerv3.Filter {
	h := t.baseHCM(statPrefix, false)
	h.RouteSpecifier = &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: rdsName, ConfigSource: adsConfigSource()}}
	h.HttpFilters = buildHTTPFilters(httpFilterInput{})
	return hcmFilter(h)
}

func hcmFilter(h *hcmv3.HttpConnectionManager) *listenerv3.Filter {
	return &listenerv3.Filter{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(h)}}
}

// serviceRouteConfig holds the routes of one HTTP Service port in one
// virtual host answering to any Host: the chain that uses it matched the
// Service's cluster IPs already. A request to this Service with another
// Service's name in Host still goes to this one (GAMMA
// MeshClusterIPMatching; it is what kube-proxy would have done).
func (t *translator) serviceRouteConfig(name string, svc *model.Service, sp *model.ServicePort) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: name, ValidateClusters: wrapperspb.Bool(false), VirtualHosts: []*routev3.VirtualHost{{
		Name:    fmt.Sprintf("%s:%d", svc.Hostname(), sp.Port),
		Domains: []string{"*"},
		Routes:  t.serviceRoutes(svc, sp),
	}}}
}

// outboundRouteConfig holds the external hosts on the port and a
// catch-all that passes through (AllowAny) or answers 502 (RegistryOnly).
func (t *translator) outboundRouteConfig(port int32) *routev3.RouteConfiguration {
	rc := &routev3.RouteConfiguration{Name: OutboundRouteName(port), ValidateClusters: wrapperspb.Bool(false)}
	domainsSeen := map[string]bool{}
	uniq := func(ds []string) []string {
		var out []string
		for _, d := range ds {
			if !domainsSeen[d] {
				domainsSeen[d] = true
				out = append(out, d)
			}
		}
		return out
	}
	for _, es := range t.mesh.External {
		for _, p := range es.Ports {
			if p.Number != port || p.Protocol != model.ExternalHTTP {
				continue
			}
			for _, h := range es.Hosts {
				domains := uniq([]string{h, fmt.Sprintf("%s:%d", h, port)})
				if len(domains) == 0 {
					continue
				}
				cluster := OutboundClusterName(h, p.Number)
				rc.VirtualHosts = append(rc.VirtualHosts, &routev3.VirtualHost{
					Name:    fmt.Sprintf("%s:%d", h, port),
					Domains: domains,
					Routes: []*routev3.Route{{
						Name:   "default",
						Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
						Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}, Timeout: noTimeout()}},
					}},
				})
			}
		}
	}
	catchAll := &routev3.VirtualHost{Name: "allow_any", Domains: []string{"*"}, Routes: []*routev3.Route{{
		Name:   "allow_any",
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: PassthroughCluster}, Timeout: noTimeout()}},
	}}}
	if t.mesh.Settings.RegistryOnly {
		catchAll = &routev3.VirtualHost{Name: "block_all", Domains: []string{"*"}, Routes: []*routev3.Route{{
			Name:   "block_all",
			Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 502}},
		}}}
	}
	rc.VirtualHosts = append(rc.VirtualHosts, catchAll)
	return rc
}
