package translate

import (
	"fmt"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	healthcheckv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// Application probes (docs/translator.md, "Probes"). The injector points
// the kubelet's HTTP, TCP and gRPC probes at /app-health/<container>/<kind>
// on the stats port, which the iptables rules never redirect, and the
// stats listener answers them from inside the pod over loopback, where
// Strict mTLS does not apply:
//   - an HTTP probe is a route that rewrites the path to the original one
//     and forwards to 127.0.0.1:<port>, so the kubelet sees the
//     application's own status code;
//   - a TCP or gRPC probe has no HTTP request to forward, so a cluster
//     127.0.0.1:<port> is health-checked actively by Envoy (TCP connect or
//     grpc.health.v1, every probe period) and a health_check filter
//     matching the probe path answers 200 while that host is healthy and
//     503 otherwise.

// probeCluster is the name of the cluster that reaches an application port
// for probes; kind is http, https, tcp or grpc.
func probeCluster(kind string, port int32, extra string) string {
	name := fmt.Sprintf("probe|%s|%d", kind, port)
	if extra != "" {
		name += "|" + extra
	}
	return name
}

func (t *translator) probeClusterFor(path string, p model.AppProbe) string {
	var name string
	switch {
	case p.HTTPGet != nil:
		kind := "http"
		if p.HTTPGet.HTTPS() {
			kind = "https"
		}
		name = probeCluster(kind, p.HTTPGet.Port, "")
	case p.TCPSocket != nil:
		// Health-checked clusters carry the probe's period and timeout, so
		// they are per path.
		name = probeCluster("tcp", p.TCPSocket.Port, probeID(path))
	case p.GRPC != nil:
		name = probeCluster("grpc", p.GRPC.Port, probeID(path))
	}
	if _, ok := t.clusters[name]; ok {
		return name
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       dur(time.Duration(p.Timeout()) * time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress("127.0.0.1", uint32(p.Port()))}}}},
		}}},
	}
	hc := &corev3.HealthCheck{
		Timeout:                  dur(time.Duration(p.Timeout()) * time.Second),
		Interval:                 dur(time.Duration(p.Period()) * time.Second),
		NoTrafficInterval:        dur(time.Duration(p.Period()) * time.Second),
		NoTrafficHealthyInterval: dur(time.Duration(p.Period()) * time.Second),
		// The kubelet applies the probe's own thresholds on top.
		UnhealthyThreshold: wrapperspb.UInt32(1),
		HealthyThreshold:   wrapperspb.UInt32(1),
	}
	switch {
	case p.HTTPGet != nil && p.HTTPGet.HTTPS():
		// The kubelet does not verify the certificate of an HTTPS probe;
		// neither does the probe cluster.
		ctx := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{}}
		c.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
	case p.TCPSocket != nil:
		hc.HealthChecker = &corev3.HealthCheck_TcpHealthCheck_{TcpHealthCheck: &corev3.HealthCheck_TcpHealthCheck{}}
		c.HealthChecks = []*corev3.HealthCheck{hc}
	case p.GRPC != nil:
		hc.HealthChecker = &corev3.HealthCheck_GrpcHealthCheck_{GrpcHealthCheck: &corev3.HealthCheck_GrpcHealthCheck{ServiceName: p.GRPC.Service}}
		c.HealthChecks = []*corev3.HealthCheck{hc}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: http2Options()}
	}
	t.clusters[name] = c
	return name
}

// statsListener serves Prometheus stats and the application probes on 15020.
func (t *translator) statsListener() *listenerv3.Listener {
	var routes []*routev3.Route
	var checks []*healthcheckv3.HealthCheck
	for _, path := range sortedKeys(t.proxy.Probes) {
		p := t.proxy.Probes[path]
		cluster := t.probeClusterFor(path, p)
		if p.HTTPGet != nil {
			routes = append(routes, &routev3.Route{
				Name:  path,
				Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: path}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{
					ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
					PrefixRewrite:    orSlash(p.HTTPGet.Path),
					Timeout:          dur(time.Duration(p.Timeout()) * time.Second),
				}},
			})
			continue
		}
		checks = append(checks, &healthcheckv3.HealthCheck{
			PassThroughMode: wrapperspb.Bool(false),
			Headers: []*routev3.HeaderMatcher{{Name: ":path", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{
				StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: path}},
			}}},
			ClusterMinHealthyPercentages: map[string]*typev3.Percent{cluster: {Value: 100}},
		})
	}
	return adminListener(StatsListenerName, StatsPort, map[string]string{"/stats/prometheus": "/stats/prometheus"}, routes, checks)
}

// probeID turns /app-health/<container>/<kind> into <container>_<kind>
// (container names cannot hold "_").
func probeID(path string) string {
	return strings.ReplaceAll(strings.TrimPrefix(path, "/app-health/"), "/", "_")
}

func orSlash(path string) string {
	if path == "" {
		return "/"
	}
	return path
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortStrings(keys)
	return keys
}
