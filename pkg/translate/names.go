package translate

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Well-known names shared with the bootstrap (pkg/inject), the CA (SDS) and
// the xDS server.
const (
	// OutboundListenerName captures outbound traffic redirected by iptables.
	OutboundListenerName = "outbound_0.0.0.0_15001"
	// InboundListenerName captures inbound traffic redirected by iptables.
	InboundListenerName = "inbound_0.0.0.0_15006"
	// StatsListenerName serves Prometheus stats on 15020.
	StatsListenerName = "stats_0.0.0.0_15020"
	// ReadinessListenerName serves the sidecar's readiness on 15021.
	ReadinessListenerName = "readiness_0.0.0.0_15021"

	OutboundPort  = 15001
	InboundPort   = 15006
	AdminPort     = 15000
	StatsPort     = 15020
	ReadinessPort = 15021

	// PassthroughCluster forwards to the original destination (AllowAny).
	PassthroughCluster = "PassthroughCluster"
	// BlackHoleCluster has no endpoints: connections to it are refused.
	BlackHoleCluster = "BlackHoleCluster"
	// AdminCluster is Envoy's own admin listener on 127.0.0.1:15000; the
	// stats and readiness listeners route to it.
	AdminCluster = "admin"
	// XDSCluster is the control plane, defined in the bootstrap.
	XDSCluster = "xds-grpc"

	// SecretWorkloadCert is the SDS name of the workload certificate and key.
	SecretWorkloadCert = "default"
	// SecretTrustBundle is the SDS name of the mesh's trust bundle.
	SecretTrustBundle = "ROOTCA"

	// TransportSocketMatchKey is the endpoint metadata key under
	// envoy.transport_socket_match that selects mTLS for meshed endpoints.
	TransportSocketMatchKey = "tlsMode"
	// TransportSocketMatchMTLS is its value for endpoints that speak mTLS.
	TransportSocketMatchMTLS = "trellis"
)

// OutboundClusterName is the cluster of a Service port:
// outbound|<port>||<name>.<namespace>.svc.cluster.local.
func OutboundClusterName(host string, port int32) string {
	return "outbound|" + strconv.Itoa(int(port)) + "||" + host
}

// InboundClusterName is the cluster forwarding to the local application port.
func InboundClusterName(port int32) string {
	return "inbound|" + strconv.Itoa(int(port)) + "||"
}

// DeniedChainName names the outbound filter chain that answers 403 for the
// Service ports (port) the proxy may not call because of the Allow
// policies (namespace/name; none: defaultAccess Deny).
func DeniedChainName(port int32, policies []string) string {
	if len(policies) == 0 {
		return "denied|" + strconv.Itoa(int(port)) + "|defaultAccess"
	}
	return "denied|" + strconv.Itoa(int(port)) + "|" + strings.Join(policies, ",")
}

// OutboundRouteName is the RDS name of the HTTP ExternalServices on a port
// (chosen by Host header, whatever the destination address).
func OutboundRouteName(port int32) string { return "outbound|" + strconv.Itoa(int(port)) }

// ServiceRouteName is the RDS name of one HTTP Service port, served to the
// filter chain of its cluster IPs: the destination address picks the
// Service, not the Host header (GAMMA's Service frontend). The name is the
// cluster's: outbound|<port>||<host>.
func ServiceRouteName(host string, port int32) string { return OutboundClusterName(host, port) }

// hostPrefix returns ip/32 or ip/128, or an error for a malformed address.
func hostPrefix(ip string) (netip.Prefix, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid IP address %q", ip)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// The source addresses of the inbound clusters' connections to the
// application; trellis-init's rules (pkg/iptables) let them through.
const (
	InboundBindIPv4 = "127.0.0.6"
	InboundBindIPv6 = "::1"
)
