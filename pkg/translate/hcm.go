package translate

import (
	"fmt"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	filev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	healthcheckv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"strings"
)

// AccessLogTextFormat is the documented format of text access logs (one
// line per request or TCP connection on the sidecar's stdout).
const AccessLogTextFormat = `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" ` +
	`%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% ` +
	`"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% "%DOWNSTREAM_PEER_URI_SAN%" "%REQ(X-REQUEST-ID)%"` + "\n"

// accessLogJSONFields are the keys of JSON access logs.
var accessLogJSONFields = map[string]string{
	"start_time":       "%START_TIME%",
	"method":           "%REQ(:METHOD)%",
	"path":             "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
	"protocol":         "%PROTOCOL%",
	"response_code":    "%RESPONSE_CODE%",
	"response_flags":   "%RESPONSE_FLAGS%",
	"bytes_received":   "%BYTES_RECEIVED%",
	"bytes_sent":       "%BYTES_SENT%",
	"duration_ms":      "%DURATION%",
	"authority":        "%REQ(:AUTHORITY)%",
	"upstream_host":    "%UPSTREAM_HOST%",
	"upstream_cluster": "%UPSTREAM_CLUSTER%",
	"peer_identity":    "%DOWNSTREAM_PEER_URI_SAN%",
	"request_id":       "%REQ(X-REQUEST-ID)%",
}

func (t *translator) accessLogs(http bool) []*accesslogv3.AccessLog {
	al := t.mesh.Settings.AccessLog
	if al == nil {
		return nil
	}
	f := &filev3.FileAccessLog{Path: "/dev/stdout"}
	if al.JSON {
		fields := map[string]*structpb.Value{}
		for k, v := range accessLogJSONFields {
			fields[k] = structpb.NewStringValue(v)
		}
		f.AccessLogFormat = &filev3.FileAccessLog_LogFormat{LogFormat: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_JsonFormat{JsonFormat: &structpb.Struct{Fields: fields}},
		}}
	} else {
		f.AccessLogFormat = &filev3.FileAccessLog_LogFormat{LogFormat: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_TextFormatSource{TextFormatSource: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: AccessLogTextFormat}}},
		}}
	}
	return []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.file", ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: mustAny(f)}}}
}

func (t *translator) baseHCM(statPrefix string, inbound bool) *hcmv3.HttpConnectionManager {
	h := &hcmv3.HttpConnectionManager{
		StatPrefix:       statPrefix,
		CodecType:        hcmv3.HttpConnectionManager_AUTO,
		AccessLog:        t.accessLogs(true),
		UseRemoteAddress: wrapperspb.Bool(false),
		// Identify the caller to the application, as Istio's XFCC does.
		ForwardClientCertDetails:     hcmv3.HttpConnectionManager_SANITIZE,
		NormalizePath:                wrapperspb.Bool(true),
		MergeSlashes:                 true,
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_KEEP_UNCHANGED,
		// WebSocket (HTTP/1.1 Upgrade) passes through; without this Envoy
		// answers an upgrade request 403.
		UpgradeConfigs: []*hcmv3.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
	}
	if inbound {
		// The application sees exactly its peer's identity: a header a
		// plaintext (Permissive) client sent is replaced, never forwarded.
		h.ForwardClientCertDetails = hcmv3.HttpConnectionManager_SANITIZE_SET
		h.SetCurrentClientCertDetails = &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true}
		h.LocalReplyConfig = inboundLocalReply
	}
	if tr := t.mesh.Settings.Tracing; tr != nil {
		h.Tracing = &hcmv3.HttpConnectionManager_Tracing{
			RandomSampling: &typev3.Percent{Value: float64(tr.SamplingPercent)},
			Provider: &tracev3.Tracing_Http{
				Name: "envoy.tracers.opentelemetry",
				ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: mustAny(&tracev3.OpenTelemetryConfig{
					GrpcService: &corev3.GrpcService{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: t.tracingCluster()}}},
					ServiceName: t.proxy.ServiceAccount + "." + t.proxy.Namespace,
				})},
			},
		}
	}
	return h
}

// tracingCluster adds the cluster of the OTLP collector, "name.namespace:port".
func (t *translator) tracingCluster() string {
	collector := t.mesh.Settings.Tracing.Collector
	hostPort := strings.SplitN(collector, ":", 2)
	name := "tracing|" + collector
	if _, ok := t.clusters[name]; ok || len(hostPort) != 2 {
		return name
	}
	var port uint32
	fmt.Sscanf(hostPort[1], "%d", &port)
	host := hostPort[0] + ".svc.cluster.local"
	t.clusters[name] = &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       dur(defaultConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(host, port)}}}},
		}}},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{httpProtocolOptionsKey: http2Options()},
	}
	return name
}

func http2Options() *anypb.Any {
	return mustAny(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})
}

// adminListener serves a few paths of Envoy's admin interface (which stays
// bound to 127.0.0.1:15000) on a pod port, for Prometheus and kubelet probes,
// then the extra routes; the health checks answer their paths before routing.
func adminListener(name string, port uint32, paths map[string]string, extraRoutes []*routev3.Route, healthChecks []*healthcheckv3.HealthCheck) *listenerv3.Listener {
	vh := &routev3.VirtualHost{Name: name, Domains: []string{"*"}}
	for _, from := range sortedKeys(paths) {
		to := paths[from]
		vh.Routes = append(vh.Routes, &routev3.Route{
			Name:  from,
			Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: from}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: AdminCluster},
				PrefixRewrite:    to,
			}},
		})
	}
	vh.Routes = append(vh.Routes, extraRoutes...)
	h := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		// Not validated against Envoy's clusters, as the inbound routes (inbound.go).
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{Name: name, ValidateClusters: wrapperspb.Bool(false), VirtualHosts: []*routev3.VirtualHost{vh}}},
		HttpFilters:    buildHTTPFilters(httpFilterInput{healthChecks: healthChecks}),
	}
	return &listenerv3.Listener{
		Name:         name,
		Address:      socketAddress("0.0.0.0", port),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{hcmFilter(h)}}},
	}
}

func (t *translator) readinessListener() *listenerv3.Listener {
	return adminListener(ReadinessListenerName, ReadinessPort, map[string]string{"/ready": "/ready"}, nil, nil)
}

func percent(p uint32) *typev3.FractionalPercent {
	return &typev3.FractionalPercent{Numerator: min(p, 100), Denominator: typev3.FractionalPercent_HUNDRED}
}

// inboundLocalReply marks the server sidecar's own 503s that its client's
// sidecar may retry on another endpoint (routes.go, NotDeliveredHeader):
//   - the app refused the connection (not listening: starting or shutting
//     down): the request never reached it, whatever its method;
//   - the app closed or reset the connection before answering a safe
//     request (GET, HEAD, OPTIONS, TRACE): typically a keep-alive
//     connection an app closes as it shuts down, raced by a new request;
//     a safe method may be repeated (RFC 9110 9.2.1; Go's HTTP client
//     retries them the same way).
//
// One value shared by every inbound HTTP connection manager: it is
// immutable once built.
var inboundLocalReply = &hcmv3.LocalReplyConfig{Mappers: []*hcmv3.ResponseMapper{
	{
		Filter: &accesslogv3.AccessLogFilter{FilterSpecifier: &accesslogv3.AccessLogFilter_ResponseFlagFilter{
			ResponseFlagFilter: &accesslogv3.ResponseFlagFilter{Flags: []string{"UF"}},
		}},
		HeadersToAdd: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: NotDeliveredHeader, Value: "upstream-connect-failure"}}},
	},
	{
		Filter: &accesslogv3.AccessLogFilter{FilterSpecifier: &accesslogv3.AccessLogFilter_AndFilter{AndFilter: &accesslogv3.AndFilter{Filters: []*accesslogv3.AccessLogFilter{
			{FilterSpecifier: &accesslogv3.AccessLogFilter_ResponseFlagFilter{ResponseFlagFilter: &accesslogv3.ResponseFlagFilter{Flags: []string{"UC", "UR"}}}},
			{FilterSpecifier: &accesslogv3.AccessLogFilter_HeaderFilter{HeaderFilter: &accesslogv3.HeaderFilter{Header: &routev3.HeaderMatcher{
				Name:                 ":method",
				HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "GET|HEAD|OPTIONS|TRACE"}}}},
			}}}},
		}}}},
		HeadersToAdd: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: NotDeliveredHeader, Value: "upstream-closed-safe-method"}}},
	},
}}
