package xds_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"

	"github.com/trellis-mesh/trellis/pkg/xds"
)

// TestHungTokenReviewFailsTheStream: an apiserver that accepts the
// TokenReview and never answers does not hold an xDS stream open: the
// review is cancelled at Authenticator.ReviewTimeout and the stream fails
// with Unavailable (the proxy retries), over a real gRPC connection.
func TestHungTokenReviewFailsTheStream(t *testing.T) {
	reviewed, cancelled := make(chan struct{}, 1), make(chan struct{}, 1)
	apiserver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/tokenreviews") {
			reviewed <- struct{}{}
		}
		// Read the request, then never answer. (net/http notices a client
		// that went away only once the request body was read.)
		_, _ = io.Copy(io.Discard, r.Body)
		<-r.Context().Done()
		cancelled <- struct{}{}
	}))
	defer apiserver.Close()
	cs, err := kubernetes.NewForConfig(&rest.Config{Host: apiserver.URL})
	if err != nil {
		t.Fatal(err)
	}
	auth := &xds.Authenticator{
		TokenReviews: cs.AuthenticationV1().TokenReviews(), Audience: "trellis", Clock: clock.RealClock{},
		CacheTTL: time.Minute, ReviewTimeout: 300 * time.Millisecond,
	}
	c, m := xds.NewCache(), xds.NewMetrics()
	srv := xds.NewServer(c, auth, xds.NewPusher(c, m, logr.Discard(), clock.RealClock{}), m, logr.Discard(), clock.RealClock{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // the test's own bound
	defer cancel()
	g := grpc.NewServer()
	srv.Register(ctx, g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	defer g.Stop()

	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer a.b.c")
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.0.0.1~p.ns~ns.svc.cluster.local"}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	if ctx.Err() != nil {
		t.Fatal("the stream was still open after a minute: the TokenReview has no deadline")
	}
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "TokenReview") {
		t.Fatalf("stream ended with %v, want Unavailable naming the TokenReview", err)
	}
	select {
	case <-reviewed:
	default:
		t.Fatal("the apiserver never saw a TokenReview")
	}
	select {
	case <-cancelled:
	case <-ctx.Done():
		t.Fatal("the hung TokenReview request was never cancelled")
	}
}
