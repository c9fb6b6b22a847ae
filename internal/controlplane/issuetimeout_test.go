package controlplane_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	"github.com/go-logr/logr"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// TestUnapprovedCertificateRequestTimesOutAndRetries: with a cert-manager
// issuer and nobody approving, a proxy's CertificateRequest (in a real
// apiserver) is given up at the pusher's Renewals.Timeout on the injected
// clock, deleted, and a new one is made after the retry back-off (10 s,
// then 20 s) — never a wait without end.
func TestUnapprovedCertificateRequestTimesOutAndRetries(t *testing.T) {
	ns := env.Namespace(t, nil)
	clk := clocktesting.NewFakeClock(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))
	cm := &ca.CertManager{Client: env.Client, Namespace: ns, IssuerRef: cmmeta.IssuerReference{Name: "nobody-approves", Kind: "ClusterIssuer"}, Clock: clk}
	c := xds.NewCache()
	p := xds.NewPusher(c, xds.NewMetrics(), logr.Discard(), clk)
	p.Renewals.Timeout = 30 * time.Second
	var failures atomic.Int32
	p.Renewals.OnFailure = func(string, error, time.Duration) { failures.Add(1) }
	mesh, _ := model.Build(model.Input{MeshConfig: &meshv1alpha1.MeshConfig{}})
	p.NodeSecrets = xds.WorkloadSecrets(&ca.Issuer{Backend: cm, Clock: clk, Metrics: ca.NewIssuerMetrics()}, func() model.Mesh { return *mesh })
	id := &xds.Identity{NodeID: xds.NodeID{Type: "sidecar", IP: "10.0.0.1", Pod: "p", Namespace: "ns"}, ServiceAccount: "sa"}
	p.Connect(id)
	defer p.Disconnect(id.NodeID.String())

	// requests waits (real time: the apiserver) until the namespace holds
	// exactly the CertificateRequests for which want says true.
	requests := func(what string, want func([]cmapi.CertificateRequest) bool) []cmapi.CertificateRequest {
		t.Helper()
		deadline := time.Now().Add(wait)
		for {
			var l cmapi.CertificateRequestList
			if err := env.Client.List(context.Background(), &l, client.InNamespace(ns)); err != nil {
				t.Fatal(err)
			}
			if want(l.Items) {
				return l.Items
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: CertificateRequests %d", what, len(l.Items))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	one := func(l []cmapi.CertificateRequest) bool { return len(l) == 1 }
	none := func(l []cmapi.CertificateRequest) bool { return len(l) == 0 }
	failed := func(n int32) {
		t.Helper()
		deadline := time.Now().Add(wait)
		for failures.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("failures %d, want %d", failures.Load(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	first := requests("the first request", one)[0].Name
	clk.Step(29 * time.Second)
	time.Sleep(200 * time.Millisecond)
	if failures.Load() != 0 {
		t.Fatal("gave up before Renewals.Timeout")
	}
	clk.Step(time.Second) // Renewals.Timeout reached
	failed(1)
	requests("the timed-out request deleted", none)

	// The retry comes 10 s later, not before.
	clk.Step(9 * time.Second)
	time.Sleep(200 * time.Millisecond)
	requests("no retry before the back-off", none)
	clk.Step(time.Second)
	second := requests("the retry's request", one)[0].Name
	if second == first {
		t.Fatalf("the retry reused %s", first)
	}
	// It times out too; the next back-off is 20 s.
	clk.Step(30 * time.Second)
	failed(2)
	requests("the second request deleted", none)
	clk.Step(19 * time.Second)
	time.Sleep(200 * time.Millisecond)
	requests("no retry before the doubled back-off", none)
	clk.Step(time.Second)
	requests("the third request", one)
}
