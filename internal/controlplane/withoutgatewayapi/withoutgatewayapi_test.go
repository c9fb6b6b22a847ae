// Package withoutgatewayapi runs the control plane against an apiserver
// that has no Gateway API CRDs.
package withoutgatewayapi_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/testenv"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env, testenv.Options{WithoutGatewayAPI: true}) }

// TestMeshRunsWithoutGatewayAPI: with no Gateway API CRDs the controller
// still starts (a watch on a missing kind would keep its caches from ever
// syncing) and serves proxies their Services and certificates; routes are
// simply not read.
func TestMeshRunsWithoutGatewayAPI(t *testing.T) {
	ctx := context.Background()
	o := controlplane.Defaults()
	o.MetricsAddr, o.ProbeAddr, o.LeaderElect = "0", "0", false
	o.XDSAddr, o.Registry, o.Log = "127.0.0.1:0", prometheus.NewRegistry(), logr.Discard()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o.WebhookHost, o.WebhookPort = "127.0.0.1", l.Addr().(*net.TCPAddr).Port
	l.Close()
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.Namespace}}); err != nil {
		t.Fatal(err)
	}
	cp, err := controlplane.New(env.Config, o)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- cp.Start(cctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("control plane: %v", err)
		}
	})
	select {
	case <-cp.Ready:
	case err := <-done:
		t.Fatalf("control plane stopped: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("xDS server did not start")
	}

	ns := env.Namespace(t, nil)
	frontend := testgen.Pod(ns, "frontend-1", testgen.WithServiceAccount("frontend"), testgen.WithIP("127.0.9.10"))
	for _, obj := range []client.Object{
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "frontend"}},
		testgen.Service(ns, "reviews", "", testgen.Port("http", 9080, 8080)),
		testgen.EndpointSlice(ns, "reviews", "reviews-a", "http", 8080, testgen.Endpoint{IP: "10.244.9.21"}),
	} {
		if err := env.Client.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
	}
	status := frontend.Status
	if err := env.Client.Create(ctx, frontend); err != nil {
		t.Fatal(err)
	}
	frontend.Status = status
	if err := env.Client.Status().Update(ctx, frontend); err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(env.Config)
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "frontend", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{"trellis"}, ExpirationSeconds: new(int64(600)),
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: frontend.Name, UID: frontend.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cp.Authority.Root())
	conn, err := xdsclient.Dial(cp.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, tr.Status.Token, frontend.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	node := xds.NodeID{Type: "sidecar", IP: frontend.Status.PodIP, Pod: frontend.Name, Namespace: ns}.String()
	c, err := xdsclient.Start(wctx, conn, node, false)
	if err != nil {
		t.Fatal(err)
	}
	cluster := fmt.Sprintf("outbound|9080||reviews.%s.svc.cluster.local", ns)
	if err := c.WaitFor(wctx, func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.ClusterType][cluster] != nil && res[resource.EndpointType][cluster] != nil &&
			res[resource.RouteType][cluster] != nil && len(res[resource.SecretType]) == 2
	}); err != nil {
		t.Fatalf("no configuration for the proxy without Gateway API CRDs: %v", err)
	}
}
