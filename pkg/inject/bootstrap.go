package inject

import (
	"fmt"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	grpccredv3 "github.com/envoyproxy/go-control-plane/envoy/config/grpc_credential/v3"
	metricsv3 "github.com/envoyproxy/go-control-plane/envoy/config/metrics/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"sigs.k8s.io/yaml"
)

// EnvoyBootstrap is the inline bootstrap (--config-yaml) of the sidecar:
// admin on 127.0.0.1:15000 only, the node id built from the pod's facts
// ($(POD_IP) etc. are expanded by Kubernetes in container args), and ADS
// (delta) to the control plane over TLS verified with the trellis-root-ca
// ConfigMap, authenticated with the projected token sent by Envoy's
// file_based_metadata call credentials. It passes go-control-plane's
// ValidateAll.
func EnvoyBootstrap(cfg Config) (string, error) {
	target := fmt.Sprintf("%s:%d", cfg.XDSHost, cfg.XDSPort)
	tokenCreds, err := anypb.New(&grpccredv3.FileBasedMetadataConfig{
		SecretData:   &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: TokenPath}},
		HeaderKey:    "authorization",
		HeaderPrefix: "Bearer ",
	})
	if err != nil {
		return "", err
	}
	h2, err := anypb.New(&httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{
		ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}},
	}})
	if err != nil {
		return "", err
	}
	ads := &corev3.ApiConfigSource{
		ApiType:                   corev3.ApiConfigSource_DELTA_GRPC,
		TransportApiVersion:       corev3.ApiVersion_V3,
		SetNodeOnFirstMessageOnly: true,
		GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_GoogleGrpc_{GoogleGrpc: &corev3.GrpcService_GoogleGrpc{
			TargetUri:  target,
			StatPrefix: "xds",
			ChannelCredentials: &corev3.GrpcService_GoogleGrpc_ChannelCredentials{CredentialSpecifier: &corev3.GrpcService_GoogleGrpc_ChannelCredentials_SslCredentials{
				SslCredentials: &corev3.GrpcService_GoogleGrpc_SslCredentials{RootCerts: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: RootCAPath}}},
			}},
			CallCredentials: []*corev3.GrpcService_GoogleGrpc_CallCredentials{{CredentialSpecifier: &corev3.GrpcService_GoogleGrpc_CallCredentials_FromPlugin{
				FromPlugin: &corev3.GrpcService_GoogleGrpc_CallCredentials_MetadataCredentialsFromPlugin{
					Name:       "envoy.grpc_credentials.file_based_metadata",
					ConfigType: &corev3.GrpcService_GoogleGrpc_CallCredentials_MetadataCredentialsFromPlugin_TypedConfig{TypedConfig: tokenCreds},
				},
			}}},
			CredentialsFactoryName: "envoy.grpc_credentials.file_based_metadata",
		}}}},
	}
	adsSource := &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3, ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{
			Id:      "sidecar~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.cluster.local",
			Cluster: "$(SERVICE_ACCOUNT).$(POD_NAMESPACE)",
		},
		Admin: &bootstrapv3.Admin{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 15000},
		}}}},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{AdsConfig: ads, CdsConfig: adsSource, LdsConfig: adsSource},
		// Envoy's default cluster_name tag ends at the first dot, so a cluster
		// named outbound|80||web.shop.svc.cluster.local became the metric
		// envoy_cluster_shop_svc_cluster_local_upstream_rq{envoy_cluster_name="outbound|80||web"}:
		// one metric family per namespace. This tag takes the whole Service
		// FQDN (Istio's bootstrap does the same); names without one keep the
		// default behaviour.
		StatsConfig: &metricsv3.StatsConfig{
			AllowDefaultTagOverrides: wrapperspb.Bool(true),
			StatsTags: []*metricsv3.TagSpecifier{{
				TagName:  "envoy.cluster_name",
				TagValue: &metricsv3.TagSpecifier_Regex{Regex: `^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)`},
			}},
		},
		// The control plane cluster is only needed by name for stats and
		// when envoy_grpc is used; google_grpc dials the target itself. It is
		// declared so `xds-grpc` exists for operators' tooling.
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{Clusters: []*clusterv3.Cluster{{
			Name:                          "xds-grpc",
			ConnectTimeout:                durationpb.New(5e9),
			ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
			TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
			LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "xds-grpc", Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: cfg.XDSHost, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(cfg.XDSPort)},
				}}}}}}},
			}}},
		}}},
	}
	if err := b.ValidateAll(); err != nil {
		return "", fmt.Errorf("sidecar bootstrap: %w", err)
	}
	j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return "", err
	}
	y, err := yaml.JSONToYAML(j)
	return string(y), err
}
