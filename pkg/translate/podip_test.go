package translate_test

import (
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/trellis-mesh/trellis/internal/manifest"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
	"github.com/trellis-mesh/trellis/pkg/translate/simulate"
)

func podIPMesh(t *testing.T, policy meshv1alpha1.OutboundPolicy) *model.Mesh {
	t.Helper()
	in, _, err := manifest.ReadFile("testdata/pod-ip.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if policy != "" {
		in.MeshConfig = &meshv1alpha1.MeshConfig{Spec: meshv1alpha1.MeshConfigSpec{OutboundPolicy: policy}}
	}
	mesh, _ := model.Build(in)
	return mesh
}

// TestPodIPCluster resolves on-demand names the way the control plane
// answers a sidecar's ODCDS request.
func TestPodIPCluster(t *testing.T) {
	cases := []struct {
		name   string
		policy meshv1alpha1.OutboundPolicy
		ok     bool
		san    string // "" for plaintext
	}{
		{"podip|10.1.0.20:8080", "", true, "spiffe://cluster.local/ns/shop/sa/reviews"},
		{"podip|10.1.0.20:9000", "", true, ""}, // excluded from capture
		{"podip|10.1.0.30:5432", "", true, ""}, // unmeshed pod
		{"podip|10.1.0.99:8080", "", true, ""}, // no such pod: passthrough
		{"podip|10.1.1.7:80", "", true, ""},    // the second node's range
		{"podip|[fd00:10:1:1::7]:80", "", true, ""},
		{"podip|10.2.0.1:80", "", false, ""}, // outside the pod networks
		{"podip|10.1.0.20", "", false, ""},   // no port
		{"podip|10.1.0.20:0", "", false, ""},
		{"podip|010.1.0.20:80", "", false, ""}, // not canonical
		{"podip|unset", "", false, ""},
		{"outbound|80||reviews.shop.svc.cluster.local", "", false, ""},
		{"podip|10.1.0.20:8080", meshv1alpha1.OutboundRegistryOnly, true, "spiffe://cluster.local/ns/shop/sa/reviews"},
		{"podip|10.1.0.30:5432", meshv1alpha1.OutboundRegistryOnly, false, ""},
		{"podip|10.1.0.99:8080", meshv1alpha1.OutboundRegistryOnly, false, ""},
	}
	for _, c := range cases {
		cl, ok := translate.PodIPCluster(podIPMesh(t, c.policy), c.name)
		if ok != c.ok {
			t.Errorf("%s (%s): resolved %v, want %v", c.name, c.policy, ok, c.ok)
			continue
		}
		if !ok {
			continue
		}
		if err := cl.ValidateAll(); err != nil {
			t.Errorf("%s: invalid cluster: %v", c.name, err)
		}
		if cl.Name != c.name {
			t.Errorf("%s: cluster named %q", c.name, cl.Name)
		}
		san := ""
		if ts := cl.GetTransportSocket(); ts != nil {
			var ctx tlsv3.UpstreamTlsContext
			if err := ts.GetTypedConfig().UnmarshalTo(&ctx); err != nil {
				t.Fatal(err)
			}
			sans := ctx.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
			if len(sans) != 1 {
				t.Fatalf("%s: %d SAN matchers", c.name, len(sans))
			}
			san = sans[0].GetMatcher().GetExact()
		}
		if san != c.san {
			t.Errorf("%s (%s): verifies SAN %q, want %q", c.name, c.policy, san, c.san)
		}
	}
}

// TestPodIPCallsInTheSimulator follows calls to pod IPs from the client's
// outbound listener through the on-demand cluster to the server's inbound
// side.
func TestPodIPCallsInTheSimulator(t *testing.T) {
	mesh := podIPMesh(t, "")
	s, p := world(t, "pod-ip")
	s.OnDemand = func(name string) (*clusterv3.Cluster, bool) { return translate.PodIPCluster(mesh, name) }
	client := p["shop/frontend-1"]

	r := send(t, s, client, simulate.Request{DestIP: "10.1.0.20", DestPort: 8080, HTTP: true, Host: "10.1.0.20:8080", Path: "/", Method: "GET"})
	if r.Chain != "podip" || r.Cluster != "podip|10.1.0.20:8080" || !r.MTLS || r.Server == nil || r.Server.Outcome != simulate.Forwarded {
		t.Fatalf("meshed pod IP: chain %q cluster %q mTLS %v server %+v", r.Chain, r.Cluster, r.MTLS, r.Server)
	}
	if r.Server.Peer != client.ID {
		t.Errorf("server saw %q, want the client's identity %q", r.Server.Peer, client.ID)
	}
	// Port 80 has a Service chain (on the cluster IP), so pod IPs on it
	// need their own chain.
	r = send(t, s, client, simulate.Request{DestIP: "10.1.0.30", DestPort: 80, HTTP: true, Host: "10.1.0.30", Path: "/", Method: "GET"})
	if r.Chain != "podip|80" || r.MTLS || r.Outcome != simulate.Forwarded {
		t.Errorf("unmeshed pod IP on port 80: chain %q mTLS %v outcome %s", r.Chain, r.MTLS, r.Outcome)
	}
	r = send(t, s, client, simulate.Request{DestIP: "10.96.0.20", DestPort: 80, HTTP: true, Host: "reviews", Path: "/", Method: "GET"})
	if r.Chain != "outbound|80||reviews.shop.svc.cluster.local" || !r.MTLS {
		t.Errorf("the Service's cluster IP: chain %q mTLS %v", r.Chain, r.MTLS)
	}
	r = send(t, s, client, simulate.Request{DestIP: "192.0.2.10", DestPort: 8080})
	if r.Chain != translate.PassthroughCluster {
		t.Errorf("an address outside the pod networks: chain %q, want the default chain", r.Chain)
	}
	// Under RegistryOnly an unmeshed pod does not resolve: the connection
	// is closed.
	ro := podIPMesh(t, meshv1alpha1.OutboundRegistryOnly)
	s.OnDemand = func(name string) (*clusterv3.Cluster, bool) { return translate.PodIPCluster(ro, name) }
	r = send(t, s, client, simulate.Request{DestIP: "10.1.0.30", DestPort: 5432})
	if r.Outcome != simulate.Refused {
		t.Errorf("unmeshed pod IP under RegistryOnly: %s, want Refused", r.Outcome)
	}
}
