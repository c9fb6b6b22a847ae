package translate

import (
	"fmt"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// Proxyless gRPC (pod annotation trellis.dev/proxy: grpc): the application's
// own gRPC library is the xDS client. It gets resources in the shapes gRPC
// expects (gRFC A27, A29, A36, A41):
//
//   - a client API listener per Service port, named "<name>.<ns>.svc.cluster.local:<port>"
//     — the application dials xds:///<that name> — with RDS of the same name;
//   - clusters whose TLS uses certificate-provider instances ("default" for the
//     workload certificate, "ROOTCA" for the trust bundle) that the bootstrap maps
//     to files, since gRPC does not take certificates over SDS;
//   - a server listener per application port, named
//     "grpc/server?xds.resource.listening_address=0.0.0.0:<port>", requiring mTLS,
//     with the RBAC filters and a non-forwarding route.
//
// gRPC has no outbound capture, so RegistryOnly, ExternalServices, access
// logs, local rate limits and server-side faults do not apply; a
// BackendPolicy's fault injection runs in the client instead.
const (
	// CertProviderInstance is the certificate-provider instance name of the
	// workload certificate and of the trust bundle in the gRPC bootstrap.
	CertProviderInstance = "default"
	// ServerListenerTemplate is the bootstrap's
	// server_listener_resource_name_template.
	ServerListenerTemplate = "grpc/server?xds.resource.listening_address=%s"
)

// ServerListenerName is the listener a proxyless server listening on
// 0.0.0.0:port asks for.
func ServerListenerName(port int32) string {
	return fmt.Sprintf(ServerListenerTemplate, fmt.Sprintf("0.0.0.0:%d", port))
}

// ProxylessGRPC returns the resources of a proxyless gRPC workload.
func ProxylessGRPC(mesh *model.Mesh, w *model.Workload) (*Resources, []model.Problem) {
	t := &translator{
		mesh: mesh, proxy: w, proxyless: true,
		clusters:  map[string]*clusterv3.Cluster{},
		endpoints: map[string]*endpointv3.ClusterLoadAssignment{},
		routes:    map[string]*routev3.RouteConfiguration{},
	}
	res := &Resources{}
	// A Service scoping leaves out still resolves, so that a call to it
	// fails at once with PERMISSION_DENIED (gRPC's fault filter, before
	// any connection) instead of waiting for a listener that never comes;
	// its route names DeniedCluster, empty, so the client gets no cluster
	// or endpoints of the Service.
	denied := &faultv3.HTTPFault{Abort: &faultv3.FaultAbort{
		Percentage: percent(100), ErrorType: &faultv3.FaultAbort_GrpcStatus{GrpcStatus: 7}, // PERMISSION_DENIED
	}}
	for _, svc := range t.mesh.Services {
		if svc.Headless() {
			continue
		}
		allowed := t.mayCall(svc)
		for i := range svc.Ports {
			sp := &svc.Ports[i]
			if !sp.Protocol.IsHTTP() {
				continue
			}
			name := fmt.Sprintf("%s:%d", svc.Hostname(), sp.Port)
			fault := clientFault(svc)
			var routes []*routev3.Route
			if allowed {
				routes = grpcRoutes(t.serviceRoutes(svc, sp))
			} else {
				fault = denied
				routes = []*routev3.Route{{
					Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: t.deniedCluster()}}},
				}}
			}
			t.routes[name] = &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{{
				Name: name, Domains: []string{name, svc.Hostname()}, Routes: routes,
			}}}
			h := &hcmv3.HttpConnectionManager{
				StatPrefix:     name,
				RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: name, ConfigSource: adsConfigSource()}},
			}
			h.HttpFilters = buildHTTPFilters(httpFilterInput{fault: fault})
			res.Listeners = append(res.Listeners, &listenerv3.Listener{
				Name:        name,
				ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(h)},
			})
		}
	}
	for _, ip := range t.inboundPorts() {
		if !ip.protocol.IsHTTP() {
			continue
		}
		// A server listening on all addresses asks for 0.0.0.0:<port>, or
		// [::]:<port> on a dual-stack socket (Go's net.Listen(":port"));
		// gRPC checks the address in the resource against its own.
		l := t.grpcServerListener(ip)
		v6 := proto.Clone(l).(*listenerv3.Listener)
		v6.Name = fmt.Sprintf(ServerListenerTemplate, fmt.Sprintf("[::]:%d", ip.port))
		v6.Address = socketAddress("::", uint32(ip.port))
		res.Listeners = append(res.Listeners, l, v6)
	}
	t.collect(res)
	return res, dedupeProblems(t.problems)
}

// DeniedCluster is the one cluster, with no endpoints, that the routes of
// Services a proxyless client may not call name (gRPC needs a cluster in a
// route; its fault filter aborts the call before the cluster is used).
const DeniedCluster = "trellis|denied"

func (t *translator) deniedCluster() string {
	if _, ok := t.clusters[DeniedCluster]; !ok {
		t.clusters[DeniedCluster] = &clusterv3.Cluster{
			Name:                 DeniedCluster,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsConfigSource(), ServiceName: DeniedCluster},
			ConnectTimeout:       dur(serviceConnectTimeout),
		}
		t.endpoints[DeniedCluster] = &endpointv3.ClusterLoadAssignment{ClusterName: DeniedCluster}
	}
	return DeniedCluster
}

// grpcRoutes adapts routes to what gRPC understands: it has no
// path_separated_prefix (a plain prefix is equivalent for gRPC's
// "/package.Service/Method" paths) and takes timeouts from
// max_stream_duration, not the route timeout.
func grpcRoutes(routes []*routev3.Route) []*routev3.Route {
	for _, r := range routes {
		if p, ok := r.Match.PathSpecifier.(*routev3.RouteMatch_PathSeparatedPrefix); ok {
			r.Match.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: p.PathSeparatedPrefix}
		}
		r.Match.Grpc = nil
		if a := r.GetRoute(); a != nil {
			if d := a.GetTimeout(); d != nil && d.AsDuration() > 0 {
				a.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: d}
			}
			a.Timeout = nil
		}
	}
	return routes
}

func clientFault(svc *model.Service) *faultv3.HTTPFault {
	if svc.Policy == nil {
		return nil
	}
	return faultFilter(svc.Policy.Fault)
}

// faultFilter is Envoy's (and gRPC's) fault filter for a BackendPolicy's
// faultInjection, or nil when it asks for nothing.
func faultFilter(fi *model.Fault) *faultv3.HTTPFault {
	if fi == nil {
		return nil
	}
	f := &faultv3.HTTPFault{}
	if d := fi.Delay; d != nil {
		f.Delay = &faultcommonv3.FaultDelay{FaultDelaySecifier: &faultcommonv3.FaultDelay_FixedDelay{FixedDelay: dur(d.Duration)}, Percentage: percent(d.Percent)}
	}
	if a := fi.Abort; a != nil {
		f.Abort = &faultv3.FaultAbort{Percentage: percent(a.Percent)}
		if a.GRPCStatus != nil {
			f.Abort.ErrorType = &faultv3.FaultAbort_GrpcStatus{GrpcStatus: *a.GRPCStatus}
		} else {
			f.Abort.ErrorType = &faultv3.FaultAbort_HttpStatus{HttpStatus: a.HTTPStatus}
		}
	}
	return f
}

// grpcTLS is the TLS context of a proxyless workload: certificates come from
// the bootstrap's certificate-provider instance, not SDS.
func grpcTLS(sans []string) *tlsv3.CommonTlsContext {
	vc := &tlsv3.CertificateValidationContext{
		CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: SecretTrustBundle},
	}
	for _, s := range sans {
		vc.MatchSubjectAltNames = append(vc.MatchSubjectAltNames, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}})
	}
	return &tlsv3.CommonTlsContext{
		TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: SecretWorkloadCert},
		ValidationContextType:          &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: vc},
	}
}

// proxylessClusterTLS sets mTLS on a proxyless client's cluster when every
// endpoint is meshed: gRPC has no transport-socket matches.
func (t *translator) proxylessClusterTLS(c *clusterv3.Cluster, svc *model.Service, port *model.ServicePort) {
	if !allMeshed(svc.Endpoints[port.Port]) {
		return
	}
	var sans []string
	for _, sa := range svc.ServiceAccounts {
		sans = append(sans, t.mesh.SPIFFEID(svc.Namespace, sa))
	}
	ctx := &tlsv3.UpstreamTlsContext{CommonTlsContext: grpcTLS(sans)}
	c.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

func (t *translator) grpcServerListener(ip *inboundPort) *listenerv3.Listener {
	h := &hcmv3.HttpConnectionManager{
		StatPrefix: InboundClusterName(ip.port),
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: InboundClusterName(ip.port),
			VirtualHosts: []*routev3.VirtualHost{{Name: "inbound", Domains: []string{"*"}, Routes: []*routev3.Route{{
				Name:   "default",
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_NonForwardingAction{NonForwardingAction: &routev3.NonForwardingAction{}},
			}}}},
		}},
	}
	deny, allow := t.rbacPolicies(ip)
	h.HttpFilters = buildHTTPFilters(httpFilterInput{deny: deny, allow: allow})
	tls := &tlsv3.DownstreamTlsContext{CommonTlsContext: grpcTLS(nil), RequireClientCertificate: wrapperspb.Bool(true)}
	return &listenerv3.Listener{
		Name:    ServerListenerName(ip.port),
		Address: socketAddress("0.0.0.0", uint32(ip.port)),
		FilterChains: []*listenerv3.FilterChain{{
			Name:            InboundClusterName(ip.port) + "|mtls",
			TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(tls)}},
			Filters:         []*listenerv3.Filter{hcmFilter(h)},
		}},
	}
}

// ForWorkload returns the resources of workload w in the shape its proxy
// mode needs (Sidecar for Envoy, ProxylessGRPC for gRPC's xDS client).
func ForWorkload(mesh *model.Mesh, w *model.Workload) (*Resources, []model.Problem) {
	if w.Mode == model.ProxyGRPC {
		return ProxylessGRPC(mesh, w)
	}
	return Sidecar(mesh, w)
}
