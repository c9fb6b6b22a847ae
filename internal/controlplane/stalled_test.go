package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
)

// TestStalledProxyIsBoundedAndDelaysNoOne (#19 item 8): a proxy that
// subscribes and then never reads nor acknowledges gets at most one
// response per type — the server answers the next request, and there is
// none, so nothing queues for it however often the mesh changes — while a
// healthy proxy on the same server follows to the last change.
func TestStalledProxyIsBoundedAndDelaysNoOne(t *testing.T) { stalledProxy(t, 50, 0) }

// TestStalledProxyWithLargeResponses is the same with a mesh of 1,000 more
// clusters (50 Services of 20 ports): the stalled proxy's first cluster response is larger than
// HTTP/2's flow-control windows, so the server's send to it blocks (a
// proxy that reads slowly, or not at all) — and still delays no one.
func TestStalledProxyWithLargeResponses(t *testing.T) { stalledProxy(t, 52, 50) }

func stalledProxy(t *testing.T, world, bulk int) {
	p := startPlane(t, nil)
	w := newWorld(t, world)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	// bulk Services of 20 ports each (the test apiserver's Service range
	// holds few more than 200).
	for i := range bulk {
		var ports []corev1.ServicePort
		for j := range int32(20) {
			ports = append(ports, testgen.Port(fmt.Sprintf("http-%d", j), 9000+j, 8080))
		}
		create(t, testgen.Service(w.ns, fmt.Sprintf("bulk-%d", i), "", ports...))
	}
	if bulk > 0 {
		p.waitRound(t, p.rounds())
	}

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
	size := p.maxBytes(stalled, resource.ClusterType)
	if bulk > 0 && size < 256<<10 {
		t.Errorf("the stalled proxy's cluster response is %d bytes: too small to exceed the flow-control windows (64 KiB initial); the test shows nothing", size)
	}
	t.Logf("stalled proxy: %d cluster (%d bytes), %d listener responses; healthy proxy: %d cluster responses over %d changes",
		p.count(stalled, resource.ClusterType), size, p.count(stalled, resource.ListenerType), p.count(nodeID(w.frontend), resource.ClusterType), changes)
}

// TestStreamCapRefusesWithResourceExhausted: a replica at its stream cap
// (--xds-max-streams) refuses one more stream with RESOURCE_EXHAUSTED and a
// message saying to retry (through the Service another replica may take
// it); once a stream ends, a new one is served.
func TestStreamCapRefusesWithResourceExhausted(t *testing.T) {
	p := startPlane(t, nil, func(o *controlplane.Options) { o.MaxStreams = 1 })
	w := newWorld(t, 51)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	pool := x509.NewCertPool()
	pool.AddCert(p.Authority.Root())
	firstConn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, token(t, w.frontend, "frontend"), w.frontend.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { firstConn.Close() })
	firstCtx, endFirst := context.WithCancel(context.Background())
	t.Cleanup(endFirst)
	first, err := xdsclient.Start(firstCtx, firstConn, nodeID(w.frontend), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
		t.Fatal(err)
	}
	conn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, token(t, w.other, "other"), w.other.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctxWait(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&discovery.DiscoveryRequest{Node: &corev3.Node{Id: nodeID(w.other)}, TypeUrl: resource.ClusterType})
	_, err = stream.Recv()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--xds-max-streams") {
		t.Fatalf("a stream over the cap: %v, want ResourceExhausted naming --xds-max-streams", err)
	}
	t.Logf("over the cap: %v", err)

	endFirst()
	deadline := time.Now().Add(wait)
	for {
		c := p.connect(t, w.other, token(t, w.other, "other"), nodeID(w.other), false)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.WaitFor(ctx, hasEndpoints(cluster, 2))
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no stream served after the first ended: %v", err)
		}
	}
}
