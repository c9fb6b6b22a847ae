package translate

import (
	"cmp"
	"slices"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// Resources is what one proxy receives, each list sorted by name.
type Resources struct {
	Listeners []*listenerv3.Listener
	Routes    []*routev3.RouteConfiguration
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Secrets are the SDS names the resources reference; the CA serves them.
	Secrets []string
}

// translator holds the state of one Sidecar call.
type translator struct {
	mesh     *model.Mesh
	proxy    *model.Workload
	problems []model.Problem

	clusters  map[string]*clusterv3.Cluster
	endpoints map[string]*endpointv3.ClusterLoadAssignment
	routes    map[string]*routev3.RouteConfiguration
	// visible and denied are the memo of scope (visibleServices,
	// deniedServices).
	visible, denied []*model.Service
	// proxyless shapes clusters for gRPC's xDS client (see ProxylessGRPC).
	proxyless bool
}

// Sidecar returns the Envoy configuration of the sidecar of workload w, and
// the problems found on the way (objects that could not be programmed). It
// never fails: what it cannot build is left out and reported.
func Sidecar(mesh *model.Mesh, w *model.Workload) (*Resources, []model.Problem) {
	t := &translator{
		mesh:      mesh,
		proxy:     w,
		clusters:  map[string]*clusterv3.Cluster{},
		endpoints: map[string]*endpointv3.ClusterLoadAssignment{},
		routes:    map[string]*routev3.RouteConfiguration{},
	}
	res := &Resources{}
	res.Listeners = append(res.Listeners, t.outboundListener(), t.inboundListener(), t.statsListener(), t.readinessListener())
	t.addStaticClusters()
	t.collect(res)
	res.Secrets = []string{SecretWorkloadCert, SecretTrustBundle}
	return res, dedupeProblems(t.problems)
}

// collect moves the clusters, endpoints and routes the translation built
// into res and sorts every list by name, so the output is deterministic.
func (t *translator) collect(res *Resources) {
	for _, c := range t.clusters {
		res.Clusters = append(res.Clusters, c)
	}
	for _, e := range t.endpoints {
		res.Endpoints = append(res.Endpoints, e)
	}
	for _, r := range t.routes {
		res.Routes = append(res.Routes, r)
	}
	slices.SortFunc(res.Listeners, func(a, b *listenerv3.Listener) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(res.Clusters, func(a, b *clusterv3.Cluster) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(res.Endpoints, func(a, b *endpointv3.ClusterLoadAssignment) int { return cmp.Compare(a.ClusterName, b.ClusterName) })
	slices.SortFunc(res.Routes, func(a, b *routev3.RouteConfiguration) int { return cmp.Compare(a.Name, b.Name) })
}

func dedupeProblems(ps []model.Problem) []model.Problem {
	slices.SortFunc(ps, func(a, b model.Problem) int {
		return cmp.Or(cmp.Compare(a.Object.String(), b.Object.String()), cmp.Compare(a.Field, b.Field), cmp.Compare(a.Message, b.Message))
	})
	return slices.Compact(ps)
}

func (t *translator) problem(obj model.Ref, field, reason, condition, msg string) {
	t.problems = append(t.problems, model.Problem{Object: obj, Field: field, Reason: reason, Condition: condition, Message: msg})
}

// mustAny packs a message; our own messages always marshal.
func mustAny(m proto.Message) *anypb.Any {
	// Deterministic, so identical inputs give byte-identical resources
	// (maps such as RBAC policies would otherwise serialize in random order).
	a := &anypb.Any{}
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		panic("translate: marshal " + string(m.ProtoReflect().Descriptor().FullName()) + ": " + err.Error())
	}
	return a
}

// dur converts a time.Duration or a model.Duration.
func dur[D ~int64](d D) *durationpb.Duration { return durationpb.New(time.Duration(d)) }

func adsConfigSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
}

func socketAddress(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// noTimeout is a zero timeout: none (Envoy's default would cut long calls).
func noTimeout() *durationpb.Duration { return durationpb.New(0) }
