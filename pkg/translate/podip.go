package translate

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	setfilterstatev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/set_filter_state/v3"
	netsetfilterstatev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// Calls to a pod IP (not a Service's cluster IP).
//
// A pod IP names no Service, so the outbound listener cannot know from LDS
// whether the destination speaks mTLS and which identity it has; putting
// every pod IP into the listener would make each endpoint change an LDS push
// to every proxy. Instead the outbound listener has one chain for the pod
// networks (Mesh.PodCIDRs; per destination port too, as Envoy matches the
// port before the address) whose tcp_proxy names the cluster
// "podip|<ip>:<port>" of the connection's original destination and
// discovers it on demand (ODCDS over the ADS stream). The control plane
// resolves such a name from the model (PodIPCluster): a meshed pod gets a
// STATIC cluster with mTLS verifying that pod's SPIFFE ID; an unmeshed pod
// (or an excluded port) plaintext; an unknown address plaintext. Under
// RegistryOnly only meshed pods resolve (the rest is closed). Only
// the proxies that call pod IPs pay for it, with one cluster per pod and
// port they call.

// PodIPClusterPrefix starts the names of on-demand pod-IP clusters.
const PodIPClusterPrefix = "podip|"

// PodIPClusterName is the on-demand cluster of a pod address and port.
func PodIPClusterName(ap netip.AddrPort) string { return PodIPClusterPrefix + ap.String() }

// podIPChainName is the outbound chain for pod IPs on a port (0: any port).
func podIPChainName(port uint32) string {
	if port == 0 {
		return "podip"
	}
	return fmt.Sprintf("podip|%d", port)
}

// podIPChains are the outbound chains for the pod networks: one without a
// port and one for each port other chains match (otherwise a pod IP on such
// a port would find no chain of that port and fall to the default chain) —
// except ports that have a chain for any address (an ExternalService's HTTP
// port, its TLS hosts): those chains keep deciding for every address there.
func (t *translator) podIPChains(chains []*listenerv3.FilterChain) []*listenerv3.FilterChain {
	if len(t.mesh.PodCIDRs) == 0 || t.proxyless {
		return nil
	}
	ports := []uint32{0}
	anyAddress := map[uint32]bool{}
	for _, fc := range chains {
		m := fc.GetFilterChainMatch()
		p := m.GetDestinationPort().GetValue()
		if p != 0 && len(m.GetPrefixRanges()) == 0 {
			anyAddress[p] = true
		}
		if p != 0 && !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	ports = slices.DeleteFunc(ports, func(p uint32) bool { return anyAddress[p] })
	var out []*listenerv3.FilterChain
	for _, p := range ports {
		m := &listenerv3.FilterChainMatch{PrefixRanges: cidrs(t.mesh.PodCIDRs...)}
		if p != 0 {
			m.DestinationPort = wrapperspb.UInt32(p)
		}
		out = append(out, &listenerv3.FilterChain{
			Name:             podIPChainName(p),
			FilterChainMatch: m,
			Filters:          []*listenerv3.Filter{podIPClusterFilter(), t.onDemandTCPProxy()},
		})
	}
	return out
}

// podIPClusterFilter names the tcp_proxy's cluster after the connection's
// original destination (restored by the original_dst listener filter).
func podIPClusterFilter() *listenerv3.Filter {
	cfg := &netsetfilterstatev3.Config{OnNewConnection: []*setfilterstatev3.FilterStateValue{{
		Key: &setfilterstatev3.FilterStateValue_ObjectKey{ObjectKey: "envoy.tcp_proxy.cluster"},
		Value: &setfilterstatev3.FilterStateValue_FormatString{FormatString: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_TextFormatSource{TextFormatSource: &corev3.DataSource{
				Specifier: &corev3.DataSource_InlineString{InlineString: PodIPClusterPrefix + "%DOWNSTREAM_LOCAL_ADDRESS%"},
			}},
		}},
	}}}
	return &listenerv3.Filter{Name: "envoy.filters.network.set_filter_state", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(cfg)}}
}

// PodIPUnknownCluster is the tcp_proxy's configured cluster on the pod-IP
// chains; the filter state always overrides it, and the control plane
// never resolves it (a connection without the filter state is closed).
const PodIPUnknownCluster = PodIPClusterPrefix + "unset"

func (t *translator) onDemandTCPProxy() *listenerv3.Filter {
	tp := &tcpproxyv3.TcpProxy{
		StatPrefix:       "podip",
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: PodIPUnknownCluster},
		OnDemand:         &tcpproxyv3.TcpProxy_OnDemand{OdcdsConfig: adsConfigSource()},
		AccessLog:        t.accessLogs(false),
	}
	return &listenerv3.Filter{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tp)}}
}

// PodIPCluster resolves an on-demand pod-IP cluster name from the model. It
// reports false for names that are not pod-IP clusters and for addresses
// the mesh does not let a sidecar reach (under RegistryOnly, anything but a
// meshed pod).
func PodIPCluster(mesh *model.Mesh, name string) (*clusterv3.Cluster, bool) {
	rest, ok := strings.CutPrefix(name, PodIPClusterPrefix)
	if !ok {
		return nil, false
	}
	ap, err := netip.ParseAddrPort(rest)
	if err != nil || ap.Port() == 0 || ap.String() != rest {
		return nil, false
	}
	ip := ap.Addr().Unmap()
	inPods := false
	for _, p := range mesh.PodCIDRs {
		if p.Contains(ip) {
			inPods = true
			break
		}
	}
	if !inPods {
		return nil, false
	}
	w := mesh.WorkloadByIP(ip.String())
	if mesh.Settings.RegistryOnly && (w == nil || w.Mode == model.ProxyNone) {
		// Only mesh members are known destinations; an unmeshed or unknown
		// pod is as unknown as any other address.
		return nil, false
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		AltStatName:          name,
		ConnectTimeout:       dur(serviceConnectTimeout),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: socketAddress(ip.String(), uint32(ap.Port())),
			}}}},
		}}},
	}
	if w != nil && w.Mode != model.ProxyNone && !slices.Contains(w.ExcludedInboundPorts, int32(ap.Port())) {
		t := &translator{mesh: mesh}
		sans := []*tlsv3.SubjectAltNameMatcher{{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: mesh.SPIFFEID(w.Namespace, w.ServiceAccount)}},
		}}
		// No ALPN: the bytes are the application's own, whatever protocol.
		ctx := &tlsv3.UpstreamTlsContext{CommonTlsContext: t.commonTLS(sans, nil)}
		c.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
	}
	return c, true
}
