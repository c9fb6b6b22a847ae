package xds_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trellis-mesh/trellis/pkg/xds"
)

// cacheHarness serves a Cache with go-control-plane's real server over a
// loopback socket; every node is bound to class "c". It tests the cache's
// protocol behaviour without authentication.
type cacheHarness struct {
	cache *xds.Cache
	ads   discovery.AggregatedDiscoveryServiceClient
}

type bindAll struct {
	serverv3.CallbackFuncs
	cache *xds.Cache
}

func (b *bindAll) OnStreamRequest(_ int64, r *discovery.DiscoveryRequest) error {
	if r.GetNode() != nil {
		b.cache.BindNode(r.GetNode().GetId(), "c")
	}
	return nil
}

func (b *bindAll) OnStreamDeltaRequest(_ int64, r *discovery.DeltaDiscoveryRequest) error {
	if r.GetNode() != nil {
		b.cache.BindNode(r.GetNode().GetId(), "c")
	}
	return nil
}

func newHarness(t *testing.T) *cacheHarness {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := xds.NewCache()
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, c, &bindAll{cache: c}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); g.Stop(); cancel() })
	return &cacheHarness{cache: c, ads: discovery.NewAggregatedDiscoveryServiceClient(conn)}
}

func cla(name string, port uint32) *xds.Resource {
	r, err := xds.NewResource(name, &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		}}, LoadBalancingWeight: wrapperspb.UInt32(1)}},
	}}})
	if err != nil {
		panic(err)
	}
	return r
}

func endpoints(rs ...*xds.Resource) xds.Class {
	m := map[string]*xds.Resource{}
	for _, r := range rs {
		m[r.Name] = r
	}
	return xds.Class{resource.EndpointType: m}
}

func recvSotw(t *testing.T, st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient) *discovery.DiscoveryResponse {
	t.Helper()
	return recv(t, st.Recv)
}

// recv waits up to 30 s for the next message of a stream.
func recv[T any](t *testing.T, next func() (T, error)) T {
	t.Helper()
	type res struct {
		r   T
		err error
	}
	ch := make(chan res, 1)
	go func() { r, err := next(); ch <- res{r, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r.r
	case <-time.After(30 * time.Second):
		t.Fatal("no response")
	}
	var zero T
	return zero
}

func names(r *discovery.DiscoveryResponse) map[string]uint32 {
	out := map[string]uint32{}
	for _, a := range r.Resources {
		var c endpointv3.ClusterLoadAssignment
		if err := a.UnmarshalTo(&c); err != nil {
			panic(err)
		}
		out[c.ClusterName] = c.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().GetPortValue()
	}
	return out
}

// TestWatchNarrowerThanTheClassIsKept is the regression test for
// go-control-plane #1356: a proxy subscribed to fewer endpoints than the
// class holds (it has not applied a cluster yet) must still get later
// updates of what it subscribed to. The stock snapshot cache of v0.14.0
// dropped such a watch without answering it.
func TestWatchNarrowerThanTheClassIsKept(t *testing.T) {
	h := newHarness(t)
	h.cache.SetClass("c", endpoints(cla("a", 1), cla("b", 1)))
	st, err := h.ads.StreamAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"}
	if err := st.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	r := recvSotw(t, st)
	if got := names(r); len(got) != 1 || got["a"] != 1 {
		t.Fatalf("first response %v, want only a", got)
	}
	if err := st.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{"a"}, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
		t.Fatal(err)
	}
	// Only b changes: nothing for this proxy (and the watch must survive).
	h.cache.SetClass("c", endpoints(cla("a", 1), cla("b", 2)))
	// Then a changes: the proxy must hear about it.
	h.cache.SetClass("c", endpoints(cla("a", 3), cla("b", 2)))
	r = recvSotw(t, st)
	if got := names(r); len(got) != 1 || got["a"] != 3 {
		t.Fatalf("update %v, want a at port 3", got)
	}
}

// TestUnsubscribedResourcesAreNeverSent is the regression test for
// go-control-plane #1498 (stale responses for unsubscribed resources): after
// a proxy drops a resource from its subscription, no later response
// carries it, however often it changes.
func TestUnsubscribedResourcesAreNeverSent(t *testing.T) {
	h := newHarness(t)
	h.cache.SetClass("c", endpoints(cla("a", 1), cla("b", 1)))
	st, err := h.ads.StreamAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"}
	if err := st.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: []string{"a", "b"}}); err != nil {
		t.Fatal(err)
	}
	r := recvSotw(t, st)
	if got := names(r); len(got) != 2 {
		t.Fatalf("first response %v, want a and b", got)
	}
	// Unsubscribe b in the ACK.
	if err := st.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{"a"}, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
		t.Fatal(err)
	}
	for i := uint32(2); i < 50; i++ {
		h.cache.SetClass("c", endpoints(cla("a", i), cla("b", i)))
		r = recvSotw(t, st)
		got := names(r)
		if _, has := got["b"]; has {
			t.Fatalf("round %d: response carries unsubscribed resource b: %v", i, got)
		}
		if got["a"] != i {
			t.Fatalf("round %d: a at %d", i, got["a"])
		}
		if err := st.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{"a"}, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDeltaSendsOnlyChangedAndRemoved checks incremental xDS: after the
// first response, an update carries only the changed resource, and a
// resource leaving the class is announced as removed.
func TestDeltaSendsOnlyChangedAndRemoved(t *testing.T) {
	h := newHarness(t)
	h.cache.SetClass("c", endpoints(cla("a", 1), cla("b", 1), cla("c", 1)))
	st, err := h.ads.DeltaAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{"a", "b", "c"}}); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Resources) != 3 {
		t.Fatalf("first delta response has %d resources", len(r.Resources))
	}
	if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResponseNonce: r.Nonce}); err != nil {
		t.Fatal(err)
	}
	h.cache.SetClass("c", endpoints(cla("a", 1), cla("b", 7)))
	r, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Resources) != 1 || r.Resources[0].Name != "b" {
		t.Errorf("update carries %v, want only b", r.Resources)
	}
	if len(r.RemovedResources) != 1 || r.RemovedResources[0] != "c" {
		t.Errorf("removed %v, want [c]", r.RemovedResources)
	}
}

// TestStockSnapshotCacheDropsNarrowWatch documents why Trellis has its own
// cache: go-control-plane v0.14.0's snapshot cache in ADS mode drops a watch
// whose names are narrower than the snapshot (#1356), so the update of "a"
// never arrives. When go-control-plane is upgraded to a release with the
// fix, this test fails: revisit the decision then.
func TestStockSnapshotCacheDropsNarrowWatch(t *testing.T) {
	sc := cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil)
	nodeID := "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"
	snap := func(version string, a, b uint32) {
		s, err := cachev3.NewSnapshot(version, map[resource.Type][]types.Resource{resource.EndpointType: {claMsg("a", a), claMsg("b", b)}})
		if err != nil {
			t.Fatal(err)
		}
		if err := sc.SetSnapshot(context.Background(), nodeID, s); err != nil {
			t.Fatal(err)
		}
	}
	snap("1", 1, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, sc, nil))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	defer g.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discovery.DiscoveryRequest{Node: &corev3.Node{Id: nodeID}, TypeUrl: resource.EndpointType, ResourceNames: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	got := make(chan *discovery.DiscoveryResponse, 4)
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				return
			}
			got <- r
		}
	}()
	select {
	case <-got:
		t.Skip("SKIP: this go-control-plane version answers the narrow first request, so the #1356 scenario does not apply; the test runs against versions that suppress it (v0.14.0 does)")
	case <-time.After(2 * time.Second):
		// v0.14.0 suppresses the response (names are not a superset) and drops the watch.
	}
	snap("2", 3, 2)
	select {
	case r := <-got:
		t.Fatalf("the stock snapshot cache now delivers the update (%d resources): go-control-plane #1356 is fixed in this version; reconsider using it", len(r.Resources))
	case <-time.After(2 * time.Second):
		t.Log("confirmed: go-control-plane v0.14.0's snapshot cache leaves the proxy on stale endpoints (#1356)")
	}
}

func claMsg(name string, port uint32) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		}}}},
	}}}
}

// TestPushOrderMakesBeforeBreak: when a class changes every type at once,
// one ADS stream receives secrets, clusters, endpoints, listeners, routes
// in that order (the xDS protocol's ADS ordering), whatever order the
// proxy subscribed in: a listener naming a new cluster never arrives first
// (Envoy NACKs an inline route to an unknown cluster).
func TestPushOrderMakesBeforeBreak(t *testing.T) {
	h := newHarness(t)
	st, err := h.ads.DeltaAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mk := func(gen int) xds.Class {
		n := fmt.Sprint("r", gen)
		msgs := map[string]proto.Message{
			resource.ListenerType: &listenerv3.Listener{Name: n},
			resource.RouteType:    &routev3.RouteConfiguration{Name: n},
			resource.ClusterType:  &clusterv3.Cluster{Name: n},
			resource.SecretType:   &tlsv3.Secret{Name: n},
		}
		c := xds.Class{}
		for typeURL, m := range msgs {
			r, err := xds.NewResource(n, m)
			if err != nil {
				t.Fatal(err)
			}
			c[typeURL] = map[string]*xds.Resource{n: r}
		}
		c[resource.EndpointType] = map[string]*xds.Resource{n: cla(n, uint32(gen))}
		return c
	}
	h.cache.SetClass("c", mk(0))
	node := &corev3.Node{Id: "order"}
	// Subscribed in the order a proxy should not be answered in.
	for _, typeURL := range []string{resource.RouteType, resource.ListenerType, resource.EndpointType, resource.ClusterType, resource.SecretType} {
		if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: typeURL, ResourceNamesSubscribe: []string{"*", "r1"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Initial answers (r0 of each type), acknowledged.
	for range 5 {
		r := recvDelta(t, st)
		if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: r.TypeUrl, ResponseNonce: r.Nonce}); err != nil {
			t.Fatal(err)
		}
	}
	for round := 1; round <= 5; round++ {
		// Every type's watch open again after the acknowledgements.
		for deadline := time.Now().Add(30 * time.Second); h.cache.Watches() < 5; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d watches open, want 5", h.cache.Watches())
			}
		}
		h.cache.SetClass("c", mk(round))
		var got []string
		for range 5 {
			r := recvDelta(t, st)
			got = append(got, r.TypeUrl[strings.LastIndex(r.TypeUrl, ".")+1:])
			if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: r.TypeUrl, ResponseNonce: r.Nonce}); err != nil {
				t.Fatal(err)
			}
		}
		if want := []string{"Secret", "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"}; !slices.Equal(got, want) {
			t.Fatalf("round %d: pushed in the order %v, want %v", round, got, want)
		}
	}
}

func recvDelta(t *testing.T, st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient) *discovery.DeltaDiscoveryResponse {
	t.Helper()
	return recv(t, st.Recv)
}

// TestOnDemandClusters follows ODCDS as Envoy does it on its delta ADS
// stream: a wildcard CDS subscription that later subscribes to names its
// class does not hold. A name the resolver knows is sent (and re-sent when
// the resolver's answer changes with a round); one it knows not to exist is
// answered as removed at once, and only when asked; the class's own
// clusters keep flowing to the wildcard subscription.
func TestOnDemandClusters(t *testing.T) {
	h := newHarness(t)
	clusterRes := func(name string, port uint32) *xds.Resource {
		r, err := xds.NewResource(name, &clusterv3.Cluster{Name: name, ConnectTimeout: durationpb.New(time.Duration(port) * time.Millisecond)})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	var version atomic.Uint32
	version.Store(1)
	h.cache.SetOnDemand(func(typeURL, name string) (*xds.Resource, bool) {
		if typeURL != resource.ClusterType || !strings.HasPrefix(name, "podip|") {
			return nil, false
		}
		if name == "podip|10.0.0.5:80" {
			return clusterRes(name, version.Load()), true
		}
		return nil, true
	})
	class := func(port uint32) xds.Class {
		return xds.Class{resource.ClusterType: {"static": clusterRes("static", port)}}
	}
	h.cache.SetClass("c", class(1))
	st, err := h.ads.DeltaAggregatedResources(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local"}
	// Legacy wildcard: Envoy's first CDS request names nothing.
	if err := st.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	r := recvDelta(t, st)
	if len(r.Resources) != 1 || r.Resources[0].Name != "static" {
		t.Fatalf("wildcard response: %v", r.Resources)
	}
	ack := func(r *discovery.DeltaDiscoveryResponse, subscribe ...string) {
		t.Helper()
		if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: r.Nonce, ResourceNamesSubscribe: subscribe}); err != nil {
			t.Fatal(err)
		}
	}
	ack(r, "podip|10.0.0.5:80")
	r = recvDelta(t, st)
	if len(r.Resources) != 1 || r.Resources[0].Name != "podip|10.0.0.5:80" || len(r.RemovedResources) != 0 {
		t.Fatalf("on-demand response: resources %v removed %v, want only podip|10.0.0.5:80", r.Resources, r.RemovedResources)
	}
	ack(r, "podip|10.0.0.6:80")
	r = recvDelta(t, st)
	if len(r.Resources) != 0 || !slices.Equal(r.RemovedResources, []string{"podip|10.0.0.6:80"}) {
		t.Fatalf("unknown on-demand name: resources %v removed %v, want it removed", r.Resources, r.RemovedResources)
	}
	ack(r)
	// A round changes the class and the resolved cluster: both are sent;
	// the missing name is not repeated.
	version.Store(2)
	h.cache.SetClass("c", class(2))
	r = recvDelta(t, st)
	got := []string{}
	for _, res := range r.Resources {
		got = append(got, res.Name)
	}
	slices.Sort(got)
	if !slices.Equal(got, []string{"podip|10.0.0.5:80", "static"}) || len(r.RemovedResources) != 0 {
		t.Fatalf("after a round: resources %v removed %v, want podip|10.0.0.5:80 and static", got, r.RemovedResources)
	}
	ack(r)
	// A round with no change sends nothing.
	h.cache.SetClass("c", class(2))
	ch := make(chan *discovery.DeltaDiscoveryResponse, 1)
	go func() {
		if r, err := st.Recv(); err == nil {
			ch <- r
		}
	}()
	select {
	case r := <-ch:
		t.Fatalf("unchanged round sent %v removed %v", r.Resources, r.RemovedResources)
	case <-time.After(300 * time.Millisecond):
	}
}
