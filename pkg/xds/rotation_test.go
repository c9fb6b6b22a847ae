package xds_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"github.com/go-logr/logr"
	clocktesting "k8s.io/utils/clock/testing"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// TestCertificateRotatesBeforeExpiry drives the pusher with a fake clock: a
// connected proxy's 2-minute certificate is renewed after 50-60 % of its
// lifetime, and the renewed one reaches the proxy's SDS watch while the old
// one is still valid.
func TestCertificateRotatesBeforeExpiry(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC))
	root, err := ca.NewSelfSigned("cluster.local", 24*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	c := xds.NewCache()
	p := xds.NewPusher(c, xds.NewMetrics(), logr.Discard(), clk)
	mesh, _ := model.Build(model.Input{MeshConfig: &meshv1alpha1.MeshConfig{Spec: meshv1alpha1.MeshConfigSpec{
		Certificates: meshv1alpha1.Certificates{Lifetime: "2m", RotationPercent: 50},
	}}})
	p.Update(mesh)
	p.NodeSecrets = xds.WorkloadSecrets(&ca.Issuer{Backend: root, Clock: clk, Metrics: ca.NewIssuerMetrics()}, func() model.Mesh { return *mesh })
	id := &xds.Identity{NodeID: xds.NodeID{Type: "sidecar", IP: "10.0.0.1", Pod: "p", Namespace: "ns"}, ServiceAccount: "sa"}
	node := id.NodeID.String()
	c.BindNode(node, "k")
	c.SetClass("k", xds.Class{})
	p.Connect(id)

	sub := stream.NewSotwSubscription([]string{"default", "ROOTCA"}, false)
	watch := func(version, nonce string) chan cachev3.Response {
		ch := make(chan cachev3.Response, 1)
		req := &discovery.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.SecretType, ResourceNames: []string{"default", "ROOTCA"}, VersionInfo: version, ResponseNonce: nonce}
		if _, err := c.CreateWatch(req, sub, ch); err != nil {
			t.Fatal(err)
		}
		return ch
	}
	recv := func(ch chan cachev3.Response) (*x509.Certificate, string) {
		t.Helper()
		select {
		case r := <-ch:
			sub.SetReturnedResources(r.GetReturnedResources())
			out, _ := r.GetDiscoveryResponse()
			for _, a := range out.Resources {
				var s tlsv3.Secret
				if err := a.UnmarshalTo(&s); err != nil {
					t.Fatal(err)
				}
				if s.Name == "default" {
					b, _ := pem.Decode(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
					cert, err := x509.ParseCertificate(b.Bytes)
					if err != nil {
						t.Fatal(err)
					}
					return cert, out.VersionInfo
				}
			}
			t.Fatal("response without the workload certificate")
		case <-time.After(10 * time.Second):
			t.Fatal("no SDS response")
		}
		return nil, ""
	}
	first, v := recv(watch("", ""))
	if got := first.NotAfter.Sub(clk.Now()); got != 2*time.Minute {
		t.Fatalf("lifetime %v", got)
	}
	next := watch(v, "1")
	// Before 50 % of the lifetime nothing is renewed.
	clk.Step(59 * time.Second)
	select {
	case <-next:
		t.Fatal("renewed before half of the lifetime")
	case <-time.After(100 * time.Millisecond):
	}
	// By 60 % (50 % plus at most 10 points of jitter) it is.
	clk.Step(13 * time.Second)
	second, _ := recv(next)
	if !clk.Now().Before(first.NotAfter) {
		t.Fatal("renewal came after the old certificate expired")
	}
	if !second.NotAfter.After(first.NotAfter) || second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Errorf("not a new certificate: %v -> %v", first.NotAfter, second.NotAfter)
	}
	if second.URIs[0].String() != "spiffe://cluster.local/ns/ns/sa/sa" {
		t.Errorf("renewed identity %v", second.URIs)
	}
}

// TestOverlappingLoadsServeTheLatest: a certificate load that started
// before a newer one (a renewal in flight when a root rotation step calls
// RefreshSecrets) and finishes after it is not served: it would put back
// the previous signer's certificate and trust bundle.
func TestOverlappingLoadsServeTheLatest(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC))
	c := xds.NewCache()
	p := xds.NewPusher(c, xds.NewMetrics(), logr.Discard(), clk)
	release := make(chan struct{})
	var calls atomic.Int32
	secret := func(gen string) map[string]*xds.Resource {
		r, err := xds.NewResource("default", &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{
			Secret: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: gen}},
		}}})
		if err != nil {
			t.Fatal(err)
		}
		return map[string]*xds.Resource{"default": r}
	}
	oldDone := make(chan struct{})
	p.NodeSecrets = func(context.Context, *xds.Identity) (*xds.NodeSecrets, error) {
		if calls.Add(1) == 1 { // the first (older) load is slow
			<-release
			defer close(oldDone)
			return &xds.NodeSecrets{Resources: secret("old signer"), RotateAt: clk.Now().Add(time.Hour)}, nil
		}
		return &xds.NodeSecrets{Resources: secret("new signer"), RotateAt: clk.Now().Add(time.Hour)}, nil
	}
	id := &xds.Identity{NodeID: xds.NodeID{Type: "sidecar", IP: "10.0.0.1", Pod: "p", Namespace: "ns"}, ServiceAccount: "sa"}
	node := id.NodeID.String()
	c.BindNode(node, "k")
	c.SetClass("k", xds.Class{})
	p.Connect(id) // starts the slow load
	for calls.Load() < 1 {
		time.Sleep(time.Millisecond)
	}
	p.RefreshSecrets() // the newer load, served at once
	served := func() string {
		ch := make(chan cachev3.Response, 1)
		sub := stream.NewSotwSubscription([]string{"default"}, false)
		req := &discovery.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.SecretType, ResourceNames: []string{"default"}}
		if _, err := c.CreateWatch(req, sub, ch); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-ch:
			out, _ := r.GetDiscoveryResponse()
			var s tlsv3.Secret
			if err := out.Resources[0].UnmarshalTo(&s); err != nil {
				t.Fatal(err)
			}
			return s.GetGenericSecret().GetSecret().GetInlineString()
		case <-time.After(10 * time.Second):
			t.Fatal("no SDS response")
		}
		return ""
	}
	if got := served(); got != "new signer" {
		t.Fatalf("served %q before the old load finished", got)
	}
	close(release)
	<-oldDone
	time.Sleep(50 * time.Millisecond) // the old load's goroutine finishes after NodeSecrets returns
	if got := served(); got != "new signer" {
		t.Errorf("the older load, finishing last, replaced the newer certificate: served %q", got)
	}
}
