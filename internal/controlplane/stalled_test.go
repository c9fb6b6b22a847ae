package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
)

// TestStalledProxyIsBoundedAndDelaysNoOne (#19 item 8): a proxy that
// subscribes and then never reads nor acknowledges gets at most one
// response per type — the server answers the next request, and there is
// none, so nothing queues for it however often the mesh changes — while a
// healthy proxy on the same server follows to the last change.
func TestStalledProxyIsBoundedAndDelaysNoOne(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 50)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)

	pool := x509.NewCertPool()
	pool.AddCert(p.Authority.Root())
	conn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, token(t, w.other, "other"), w.other.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stalled := nodeID(w.other)
	types := []string{resource.ClusterType, resource.ListenerType}
	for _, typ := range types {
		if err := stream.Send(&discovery.DiscoveryRequest{Node: &corev3.Node{Id: stalled}, TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}

	fe := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	if err := fe.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
		t.Fatal(err)
	}
	// Every change touches what both proxies see: a Service each (a new
	// cluster and listener chain for both), and the endpoints of reviews.
	const changes = 20
	for i := range changes {
		create(t, testgen.Service(w.ns, fmt.Sprintf("extra-%d", i), "", testgen.Port("http", 9080, 8080)))
		var slice = testgen.EndpointSlice(w.ns, "reviews", "reviews-a", "http", 8080, testgen.Endpoint{IP: fmt.Sprintf("10.244.50.%d", 100+i), Pod: "reviews-1"})
		var cur = slice.DeepCopy()
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(slice), cur); err != nil {
			t.Fatal(err)
		}
		cur.Endpoints = slice.Endpoints
		if err := env.Client.Update(context.Background(), cur); err != nil {
			t.Fatal(err)
		}
	}
	last := fmt.Sprintf("outbound|9080||extra-%d.%s.svc.cluster.local", changes-1, w.ns)
	if err := fe.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.ClusterType][last] != nil
	}); err != nil {
		t.Fatalf("the healthy proxy did not follow the changes: %v", err)
	}
	p.settle(t, nodeID(w.frontend))
	for _, typ := range types {
		// One: its subscription was answered (it is an authenticated,
		// served proxy), and nothing after, as it never asked again.
		if got := p.count(stalled, typ); got != 1 {
			t.Errorf("the stalled proxy was sent %d %s responses; want exactly 1", got, typ)
		}
	}
	if got := p.count(nodeID(w.frontend), resource.ClusterType); got < 2 {
		t.Errorf("the healthy proxy got %d cluster responses over %d changes", got, changes)
	}
	t.Logf("stalled proxy: %d cluster, %d listener responses; healthy proxy: %d cluster responses over %d changes",
		p.count(stalled, resource.ClusterType), p.count(stalled, resource.ListenerType), p.count(nodeID(w.frontend), resource.ClusterType), changes)
}
