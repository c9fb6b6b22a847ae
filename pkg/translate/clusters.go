package translate

import (
	"cmp"
	"math"
	"slices"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	leastrequestv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/least_request/v3"
	roundrobinv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/round_robin/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

const (
	defaultConnectTimeout = 5 * time.Second
	// serviceConnectTimeout bounds a connection to a mesh endpoint (a pod
	// on the cluster network; Linkerd's default too): an endpoint whose pod
	// just went away black-holes the SYN, and the default retry on
	// connect-failure then moves to another endpoint within a second
	// instead of hanging for five. BackendPolicy connection.connectTimeout
	// overrides it.
	serviceConnectTimeout      = time.Second
	httpProtocolOptionsKey     = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	transportSocketMatchFilter = "envoy.transport_socket_match"
)

// serviceCluster adds (once) the cluster and endpoints of a Service port and
// returns the cluster name.
func (t *translator) serviceCluster(svc *model.Service, port *model.ServicePort) string {
	name := OutboundClusterName(svc.Hostname(), port.Port)
	if _, ok := t.clusters[name]; ok {
		return name
	}
	c := &clusterv3.Cluster{
		Name:           name,
		ConnectTimeout: dur(serviceConnectTimeout),
		AltStatName:    name,
	}
	if svc.Headless() {
		// Clients of a headless Service dial pod IPs themselves: forward to
		// the address they chose (L4 only; routes do not apply).
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST}
		c.LbPolicy = clusterv3.Cluster_CLUSTER_PROVIDED
		if allMeshed(svc.Endpoints[port.Port]) {
			c.TransportSocket = t.upstreamTLS(svc, port)
		}
	} else if t.proxyless {
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsConfigSource(), ServiceName: name}
		t.proxylessClusterTLS(c, svc, port)
		t.endpoints[name] = t.loadAssignment(name, svc, port)
	} else {
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsConfigSource(), ServiceName: name}
		c.TransportSocketMatches = []*clusterv3.Cluster_TransportSocketMatch{{
			Name:            "mtls",
			Match:           &structpb.Struct{Fields: map[string]*structpb.Value{TransportSocketMatchKey: structpb.NewStringValue(TransportSocketMatchMTLS)}},
			TransportSocket: t.upstreamTLS(svc, port),
		}}
		t.endpoints[name] = t.loadAssignment(name, svc, port)
	}
	if port.Protocol.IsHTTP2() {
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: mustAny(&httpv3.HttpProtocolOptions{
			UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
			}},
		})}
	}
	if !t.proxyless {
		c.CircuitBreakers = unlimitedCircuitBreakers()
	}
	if svc.Policy != nil {
		t.applyBackendPolicy(c, svc.Policy)
	}
	t.clusters[name] = c
	return name
}

// unlimitedCircuitBreakers lifts Envoy's per-cluster defaults (1,024
// connections, pending and active requests; 3 retries in flight) on a
// sidecar's Service clusters, as Istio does: they are limits nobody chose.
// Three retries in flight is the one that bites: when replicas go away
// under load, every request that met a dead endpoint retries at once, and
// the fourth fails with the first attempt's 503 although other endpoints
// are healthy (seen scaling 3 → 1 replicas at 50 req/s). A BackendPolicy's
// connection limits replace these values one by one.
func unlimitedCircuitBreakers() *clusterv3.CircuitBreakers {
	u := func() *wrapperspb.UInt32Value { return wrapperspb.UInt32(math.MaxUint32) }
	return &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
		Priority: corev3.RoutingPriority_DEFAULT, MaxConnections: u(), MaxPendingRequests: u(), MaxRequests: u(), MaxRetries: u(),
	}}}
}

func allMeshed(eps []model.Endpoint) bool {
	if len(eps) == 0 {
		return false
	}
	for _, e := range eps {
		if e.Mesh == model.ProxyNone {
			return false
		}
	}
	return true
}

// upstreamTLS presents the workload certificate and verifies the server's
// SPIFFE ID against the ServiceAccounts behind the Service.
func (t *translator) upstreamTLS(svc *model.Service, port *model.ServicePort) *corev3.TransportSocket {
	var sans []*tlsv3.SubjectAltNameMatcher
	for _, sa := range svc.ServiceAccounts {
		sans = append(sans, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: t.mesh.SPIFFEID(svc.Namespace, sa)}},
		})
	}
	alpn := []string{"http/1.1"}
	if port.Protocol.IsHTTP2() {
		alpn = []string{"h2"}
	} else if !port.Protocol.IsHTTP() {
		alpn = nil
	}
	ctx := &tlsv3.UpstreamTlsContext{
		Sni:              svc.Hostname(),
		CommonTlsContext: t.commonTLS(sans, alpn),
	}
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

func (t *translator) commonTLS(sans []*tlsv3.SubjectAltNameMatcher, alpn []string) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: SecretWorkloadCert, SdsConfig: adsConfigSource()}},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
			ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: SecretTrustBundle, SdsConfig: adsConfigSource()},
		}},
		AlpnProtocols: alpn,
	}
}

func (t *translator) applyBackendPolicy(c *clusterv3.Cluster, p *model.TrafficPolicy) {
	if p.ConnectTimeout > 0 {
		c.ConnectTimeout = dur(p.ConnectTimeout)
	}
	if l := p.Limits; l != nil {
		// Set limits replace the defaults (unlimited on sidecars; Envoy's
		// and gRPC's own on proxyless clients) one by one.
		if c.CircuitBreakers == nil {
			c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{Priority: corev3.RoutingPriority_DEFAULT}}}
		}
		th := c.CircuitBreakers.Thresholds[0]
		set := func(dst **wrapperspb.UInt32Value, v *uint32) {
			if v != nil {
				*dst = wrapperspb.UInt32(*v)
			}
		}
		set(&th.MaxConnections, l.MaxConnections)
		set(&th.MaxPendingRequests, l.MaxPendingRequests)
		set(&th.MaxRequests, l.MaxRequests)
		set(&th.MaxRetries, l.MaxRetries)
	}
	if od := p.Outlier; od != nil {
		o := &clusterv3.OutlierDetection{
			Consecutive_5Xx:    wrapperspb.UInt32(od.Consecutive5xx),
			MaxEjectionPercent: wrapperspb.UInt32(od.MaxEjectionPercent),
		}
		if od.Interval > 0 {
			o.Interval = dur(od.Interval)
		}
		if od.BaseEjectionTime > 0 {
			o.BaseEjectionTime = dur(od.BaseEjectionTime)
		}
		if t.proxyless {
			// gRPC implements failure-percentage and success-rate ejection,
			// not consecutive errors (gRFC A50): an endpoint that failed 85 %
			// or more of at least consecutive5xxErrors calls in an interval
			// is ejected.
			o.FailurePercentageThreshold = wrapperspb.UInt32(85)
			o.EnforcingFailurePercentage = wrapperspb.UInt32(100)
			o.FailurePercentageMinimumHosts = wrapperspb.UInt32(1)
			o.FailurePercentageRequestVolume = o.Consecutive_5Xx
			o.EnforcingSuccessRate = wrapperspb.UInt32(0)
		}
		c.OutlierDetection = o
	}
	switch {
	case p.LoadBalancer == "RingHash":
		c.LbPolicy = clusterv3.Cluster_RING_HASH
	case !t.proxyless && p.LoadBalancer == "LeastRequest":
		c.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
	case !t.proxyless && p.LoadBalancer == "Random":
		c.LbPolicy = clusterv3.Cluster_RANDOM
	case p.LoadBalancer == "LeastRequest":
		// Not every gRPC has least request (gRFC A48: Go and Java do; C-core
		// and grpc-js NACK the lb_policy): as a load_balancing_policy list
		// (gRFC A52) each client takes the first policy it implements, and
		// one without A52 reads lb_policy, left at ROUND_ROBIN.
		c.LoadBalancingPolicy = &clusterv3.LoadBalancingPolicy{Policies: []*clusterv3.LoadBalancingPolicy_Policy{
			{TypedExtensionConfig: &corev3.TypedExtensionConfig{Name: "envoy.load_balancing_policies.least_request", TypedConfig: mustAny(&leastrequestv3.LeastRequest{})}},
			{TypedExtensionConfig: &corev3.TypedExtensionConfig{Name: "envoy.load_balancing_policies.round_robin", TypedConfig: mustAny(&roundrobinv3.RoundRobin{})}},
		}}
	case p.LoadBalancer == "Random":
		// gRPC has no random policy and NACKs RANDOM: round robin, and the
		// policy says so.
		t.problem(model.Ref{Kind: "BackendPolicy", Namespace: p.Namespace, Name: p.Name}, "spec.loadBalancer.algorithm", model.ReasonUnsupportedValue, model.ConditionAccepted,
			"gRPC has no Random load balancing: proxyless gRPC clients use RoundRobin (Envoy sidecars use Random); write RoundRobin or LeastRequest to mean the same for both")
	}
}

// loadAssignment builds the endpoints of a Service port: ready endpoints,
// or serving-but-terminating ones when none is ready (Kubernetes'
// ProxyTerminatingEndpoints semantics). Endpoints are grouped by zone; with
// outlier detection on, the proxy's own zone gets priority 0 and others
// priority 1 (locality failover, as Istio does).
func (t *translator) loadAssignment(name string, svc *model.Service, port *model.ServicePort) *endpointv3.ClusterLoadAssignment {
	eps := svc.Endpoints[port.Port]
	var use []model.Endpoint
	for _, e := range eps {
		if e.Ready && !e.Terminating {
			use = append(use, e)
		}
	}
	if len(use) == 0 {
		for _, e := range eps {
			if e.Serving {
				use = append(use, e)
			}
		}
	}
	failover := failoverZone(svc, t.proxy) != ""
	byZone := map[string][]*endpointv3.LbEndpoint{}
	for _, e := range use {
		lbe := &endpointv3.LbEndpoint{
			HostIdentifier:      &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(e.IP, uint32(e.Port))}},
			HealthStatus:        corev3.HealthStatus_HEALTHY,
			LoadBalancingWeight: wrapperspb.UInt32(1),
		}
		if e.Mesh != model.ProxyNone {
			lbe.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
				transportSocketMatchFilter: {Fields: map[string]*structpb.Value{TransportSocketMatchKey: structpb.NewStringValue(TransportSocketMatchMTLS)}},
			}}
		}
		byZone[e.Zone] = append(byZone[e.Zone], lbe)
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	zones := make([]string, 0, len(byZone))
	for z := range byZone {
		zones = append(zones, z)
	}
	slices.Sort(zones)
	for _, z := range zones {
		l := &endpointv3.LocalityLbEndpoints{
			LbEndpoints:         byZone[z],
			LoadBalancingWeight: wrapperspb.UInt32(uint32(len(byZone[z]))),
			// Always set, even without a zone: gRPC's xDS client rejects a
			// locality without an ID (found by the gRPC-Go consumer test).
			Locality: &corev3.Locality{Zone: z},
		}
		if failover && z != t.proxy.Zone {
			l.Priority = 1
		}
		cla.Endpoints = append(cla.Endpoints, l)
	}
	return cla
}

// failoverZone is the proxy's zone when the Service's endpoints are
// prioritised by it (outlier detection on, the proxy in a zone), else "".
func failoverZone(svc *model.Service, proxy *model.Workload) string {
	if svc.Policy != nil && svc.Policy.Outlier != nil {
		return proxy.Zone
	}
	return ""
}

// externalCluster adds the cluster of an ExternalService host port.
func (t *translator) externalCluster(host string, p model.ExternalPort) string {
	target := p.TargetPort
	name := OutboundClusterName(host, p.Number)
	if _, ok := t.clusters[name]; ok {
		return name
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       dur(defaultConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_LOGICAL_DNS},
		DnsLookupFamily:      clusterv3.Cluster_V4_PREFERRED,
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(host, uint32(target))}}}},
		}}},
	}
	if p.TLS != nil {
		sni := cmp.Or(p.TLS.SNI, host)
		ctx := &tlsv3.UpstreamTlsContext{
			Sni: sni,
			CommonTlsContext: &tlsv3.CommonTlsContext{
				TlsParams: &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
				ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
					TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: SystemCABundle}},
					MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
						SanType: tlsv3.SubjectAltNameMatcher_DNS,
						Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: strings.ToLower(sni)}},
					}},
				}},
			},
		}
		c.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
	}
	t.clusters[name] = c
	return name
}

// SystemCABundle is where the stock Envoy image keeps the system roots.
const SystemCABundle = "/etc/ssl/certs/ca-certificates.crt"

// originalDstCluster forwards to the address the application dialled.
func originalDstCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       dur(defaultConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
	}
}

func (t *translator) addStaticClusters() {
	t.clusters[PassthroughCluster] = originalDstCluster(PassthroughCluster)
	t.clusters[BlackHoleCluster] = &clusterv3.Cluster{
		Name:                 BlackHoleCluster,
		ConnectTimeout:       dur(defaultConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
	}
	t.clusters[AdminCluster] = &clusterv3.Cluster{
		Name:                 AdminCluster,
		ConnectTimeout:       dur(defaultConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: AdminCluster, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress("127.0.0.1", AdminPort)}}}},
		}}},
	}
}
