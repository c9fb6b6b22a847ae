package translate_test

import (
	"math"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
	"github.com/trellis-mesh/trellis/pkg/translate/simulate"
)

// world translates a golden input for every meshed pod in it and returns a
// simulator over all of them, and the proxies by "namespace/pod".
func world(t *testing.T, caseName string) (*simulate.Simulator, map[string]*simulate.Proxy) {
	t.Helper()
	in, _, err := manifest.ReadFile("testdata/" + caseName + ".in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	mesh, _ := model.Build(in)
	proxies := map[string]*simulate.Proxy{}
	var all []*simulate.Proxy
	for _, w := range mesh.Workloads {
		if w.Mode == model.ProxyNone || len(w.IPs) == 0 {
			continue
		}
		res, _ := translate.Sidecar(mesh, w)
		p := &simulate.Proxy{Resources: res, ID: mesh.SPIFFEID(w.Namespace, w.ServiceAccount), IP: w.IPs[0]}
		proxies[w.Namespace+"/"+w.Name] = p
		all = append(all, p)
	}
	return simulate.New(1, all...), proxies
}

func get(path string) simulate.Request {
	return simulate.Request{DestIP: "10.96.0.20", DestPort: 9080, HTTP: true, Host: "reviews.shop:9080", Path: path, Method: "GET"}
}

func send(t *testing.T, s *simulate.Simulator, from *simulate.Proxy, req simulate.Request) *simulate.Result {
	t.Helper()
	if from == nil {
		t.Fatal("no such proxy")
	}
	r, err := s.Send(from, req)
	if err != nil {
		t.Fatalf("simulate: %v", err)
	}
	return r
}

func TestStrictMTLS(t *testing.T) {
	s, p := world(t, "basic-http-and-tcp")
	r := send(t, s, p["shop/frontend-1"], simulate.Request{DestIP: "10.96.0.20", DestPort: 9080, HTTP: true, Host: "reviews", Path: "/", Method: "GET"})
	if r.Outcome != simulate.Forwarded || !r.MTLS || r.Server == nil || r.Server.Outcome != simulate.Forwarded {
		t.Fatalf("meshed request: %+v server %+v", r, r.Server)
	}
	if want := "spiffe://cluster.local/ns/shop/sa/frontend"; r.Server.Peer != want {
		t.Errorf("server saw peer %q, want %q", r.Server.Peer, want)
	}
	// A plaintext client reaching the server's inbound port directly finds no
	// filter chain under Strict mTLS.
	in, err := simulate.Inbound(p["shop/reviews-1"], simulate.InboundRequest{DestPort: 8080, HTTP: true, Path: "/", Method: "GET"})
	if err != nil {
		t.Fatal(err)
	}
	if in.Outcome != simulate.Refused {
		t.Errorf("plaintext to a Strict server: %s, want Refused", in.Outcome)
	}
	// TLS without a client certificate fails the handshake.
	in, err = simulate.Inbound(p["shop/reviews-1"], simulate.InboundRequest{DestPort: 8080, TLS: true, HTTP: true, Path: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if in.Outcome != simulate.HandshakeFailed {
		t.Errorf("TLS without client certificate: %s, want HandshakeFailed", in.Outcome)
	}
	// A port no Service declares is closed.
	in, err = simulate.Inbound(p["shop/reviews-1"], simulate.InboundRequest{DestPort: 9999, TLS: true, Peer: "spiffe://cluster.local/ns/shop/sa/frontend"})
	if err != nil {
		t.Fatal(err)
	}
	if in.Outcome != simulate.Refused {
		t.Errorf("undeclared port: %s, want Refused", in.Outcome)
	}
}

func TestPermissiveAcceptsPlaintext(t *testing.T) {
	_, p := world(t, "permissive-mtls-server")
	for _, tls := range []bool{false, true} {
		peer := ""
		if tls {
			peer = "spiffe://cluster.local/ns/shop/sa/frontend"
		}
		in, err := simulate.Inbound(p["shop/reviews-v1-1"], simulate.InboundRequest{DestPort: 8080, TLS: tls, Peer: peer, HTTP: true, Path: "/", Method: "GET"})
		if err != nil {
			t.Fatal(err)
		}
		if in.Outcome != simulate.Forwarded {
			t.Errorf("tls=%v: %s, want Forwarded", tls, in.Outcome)
		}
	}
}

func TestAccessPolicyAllow(t *testing.T) {
	_, p := world(t, "accesspolicy-allow")
	server := p["shop/reviews-v1-1"]
	tests := []struct {
		name   string
		peer   string
		method string
		path   string
		want   simulate.Outcome
	}{
		{"the frontend may GET a review", "spiffe://cluster.local/ns/shop/sa/frontend", "GET", "/reviews/1", simulate.Forwarded},
		{"the frontend may GET the prefix itself", "spiffe://cluster.local/ns/shop/sa/frontend", "GET", "/reviews", simulate.Forwarded},
		{"a prefix matches whole segments only", "spiffe://cluster.local/ns/shop/sa/frontend", "GET", "/reviewsx", simulate.Denied},
		{"the frontend may not POST", "spiffe://cluster.local/ns/shop/sa/frontend", "POST", "/reviews/1", simulate.Denied},
		{"any workload of ops may GET /health", "spiffe://cluster.local/ns/ops/sa/prober", "GET", "/health", simulate.Forwarded},
		{"another ServiceAccount of shop is denied", "spiffe://cluster.local/ns/shop/sa/bar", "GET", "/reviews/1", simulate.Denied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := simulate.Inbound(server, simulate.InboundRequest{DestPort: 8080, TLS: true, Peer: tt.peer, HTTP: true, Method: tt.method, Path: tt.path})
			if err != nil {
				t.Fatal(err)
			}
			if in.Outcome != tt.want {
				t.Errorf("%s, want %s", in.Outcome, tt.want)
			}
		})
	}
}

func TestAccessPolicyDenyThenAllow(t *testing.T) {
	_, p := world(t, "accesspolicy-deny-and-allow")
	server := p["shop/reviews-v1-1"]
	legacy := "spiffe://cluster.local/ns/old/sa/legacy"
	for _, tt := range []struct {
		peer, method string
		want         simulate.Outcome
		deniedBy     string
	}{
		{legacy, "POST", simulate.Denied, "deny"},
		{legacy, "GET", simulate.Forwarded, ""},
		{"spiffe://cluster.local/ns/shop/sa/frontend", "POST", simulate.Forwarded, ""},
	} {
		in, err := simulate.Inbound(server, simulate.InboundRequest{DestPort: 8080, TLS: true, Peer: tt.peer, HTTP: true, Method: tt.method, Path: "/"})
		if err != nil {
			t.Fatal(err)
		}
		if in.Outcome != tt.want || in.DeniedBy != tt.deniedBy {
			t.Errorf("%s %s: %s by %q, want %s by %q", tt.peer, tt.method, in.Outcome, in.DeniedBy, tt.want, tt.deniedBy)
		}
	}
	// Plaintext callers have no identity: the allow-any-meshed policy does not match them.
	_, p2 := world(t, "accesspolicy-deny-and-allow")
	in, _ := simulate.Inbound(p2["shop/reviews-v1-1"], simulate.InboundRequest{DestPort: 8080, TLS: true, Peer: "", HTTP: true})
	if in.Outcome != simulate.HandshakeFailed {
		t.Errorf("no certificate: %s", in.Outcome)
	}
}

func TestAccessPolicyOnTCP(t *testing.T) {
	_, p := world(t, "accesspolicy-tcp-port")
	db := p["data/db-1"]
	for _, tt := range []struct {
		name string
		peer string
		port uint32
		want simulate.Outcome
	}{
		{"reviews may connect to 5432", "spiffe://cluster.local/ns/shop/sa/reviews", 5432, simulate.Forwarded},
		{"reviews may not connect to the metrics port", "spiffe://cluster.local/ns/shop/sa/reviews", 9187, simulate.Denied},
		{"a rule with paths never matches TCP", "spiffe://cluster.local/ns/ops/sa/prom", 9187, simulate.Denied},
	} {
		in, err := simulate.Inbound(db, simulate.InboundRequest{DestPort: tt.port, TLS: true, Peer: tt.peer})
		if err != nil {
			t.Fatal(err)
		}
		if in.Outcome != tt.want {
			t.Errorf("%s: %s, want %s", tt.name, in.Outcome, tt.want)
		}
	}
}

func TestDefaultAccessDeny(t *testing.T) {
	s, p := world(t, "default-access-deny")
	in, err := simulate.Inbound(p["shop/reviews-v1-1"], simulate.InboundRequest{DestPort: 8080, TLS: true, Peer: "spiffe://cluster.local/ns/shop/sa/frontend", HTTP: true, Path: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if in.Outcome != simulate.Denied {
		t.Errorf("defaultAccess Deny: %s", in.Outcome)
	}
	// The frontend is not given reviews' cluster or endpoints: its own
	// sidecar answers 403 saying why, without a connection to the server.
	r := send(t, s, p["shop/frontend-1"], get("/"))
	if r.Chain != translate.DeniedChainName(9080, nil) || r.Outcome != simulate.Responded || r.Status != 403 || len(r.Clusters) != 0 {
		t.Errorf("chain %q: %s %d via %v, want 403 from the denial chain", r.Chain, r.Outcome, r.Status, r.Clusters)
	}
	for _, c := range p["shop/frontend-1"].Resources.Clusters {
		if strings.Contains(c.Name, "reviews") {
			t.Errorf("the frontend has a cluster for reviews: %s", c.Name)
		}
	}
}

func TestWeightedSplit(t *testing.T) {
	s, p := world(t, "httproute-weighted-split")
	counts := map[string]int{}
	const n = 10000
	for range n {
		r := send(t, s, p["shop/frontend-1"], get("/"))
		if r.Outcome != simulate.Forwarded {
			t.Fatalf("outcome %s", r.Outcome)
		}
		counts[r.Cluster]++
	}
	v1 := float64(counts["outbound|9080||reviews-v1.shop.svc.cluster.local"]) / n
	if math.Abs(v1-0.8) > 0.02 {
		t.Errorf("reviews-v1 got %.3f of requests, want 0.80±0.02 (%v)", v1, counts)
	}
	if counts["outbound|9080||reviews-v2.shop.svc.cluster.local"] == 0 {
		t.Errorf("reviews-v2 got no request: %v", counts)
	}
}

func TestMatchesFollowPrecedence(t *testing.T) {
	s, p := world(t, "httproute-matches")
	v1, v2 := "outbound|9080||reviews-v1.shop.svc.cluster.local", "outbound|9080||reviews-v2.shop.svc.cluster.local"
	for _, tt := range []struct {
		name string
		req  simulate.Request
		want string
	}{
		{"a plain request takes the catch-all rule", get("/products"), v1},
		{"the exact path wins over longer prefixes", get("/api/health"), v1},
		{"a header match selects the canary", func() simulate.Request {
			r := get("/api/x")
			r.Headers = map[string]string{"X-Canary": "true"}
			return r
		}(), v2},
		{"a method match selects v2 for POST", func() simulate.Request { r := get("/api/x"); r.Method = "POST"; return r }(), v2},
		{"without the header or method, /api falls to the catch-all", get("/api/x"), v1},
		{"regex, header regex and query matches together", func() simulate.Request {
			r := get("/items/42?debug=1&v=2.1")
			r.Headers = map[string]string{"x-user": "alice"}
			return r
		}(), v2},
		{"a query value that does not match falls through", func() simulate.Request {
			r := get("/items/42?debug=0&v=2.1")
			r.Headers = map[string]string{"x-user": "alice"}
			return r
		}(), v1},
	} {
		r := send(t, s, p["shop/frontend-1"], tt.req)
		if r.Cluster != tt.want {
			t.Errorf("%s: cluster %q (route %s), want %q", tt.name, r.Cluster, r.Route.GetName(), tt.want)
		}
	}
}

func TestRetriesAndTimeoutsReachTheRoute(t *testing.T) {
	s, p := world(t, "backendpolicy-client-side")
	r := send(t, s, p["shop/frontend-1"], get("/"))
	a := r.Route.GetRoute()
	if a.GetTimeout().AsDuration().String() != "10s" {
		t.Errorf("timeout %v, want 10s", a.GetTimeout().AsDuration())
	}
	rp := a.GetRetryPolicy()
	if rp.GetNumRetries().GetValue() != 3 || rp.GetPerTryTimeout().AsDuration().String() != "2s" || rp.GetRetryOn() != "5xx,reset,unavailable,retriable-headers" {
		t.Errorf("retry policy %v", rp)
	}
	s, p = world(t, "httproute-timeouts-retry")
	r = send(t, s, p["shop/frontend-1"], get("/slow/x"))
	a = r.Route.GetRoute()
	if a.GetTimeout().AsDuration().String() != "5s" || a.GetRetryPolicy().GetNumRetries().GetValue() != 4 || a.GetRetryPolicy().GetPerTryTimeout().AsDuration().String() != "1s" {
		t.Errorf("route-level timeouts and retry do not override the BackendPolicy: %v", a)
	}
	r = send(t, s, p["shop/frontend-1"], get("/fast"))
	if got := r.Route.GetRoute().GetTimeout().AsDuration().String(); got != "30s" {
		t.Errorf("without route timeouts the BackendPolicy's 30s applies, got %s", got)
	}
}

func TestConsumerRouteOverridesProducer(t *testing.T) {
	s, p := world(t, "httproute-consumer-overrides-producer")
	v2 := "outbound|9080||reviews-v2.shop.svc.cluster.local"
	req := get("/")
	req.Host = "reviews.shop"
	for range 200 {
		if r := send(t, s, p["web/portal-1"], req); r.Cluster != v2 {
			t.Fatalf("web client reached %q, want only %q", r.Cluster, v2)
		}
	}
	seen := map[string]bool{}
	for range 200 {
		seen[send(t, s, p["shop/frontend-1"], get("/")).Cluster] = true
	}
	if len(seen) != 2 {
		t.Errorf("shop client should get the producer 50/50 split, saw %v", seen)
	}
}

func TestRegistryOnlyAndExternalServices(t *testing.T) {
	s, p := world(t, "registry-only-external")
	fe := p["shop/frontend-1"]
	for _, tt := range []struct {
		name        string
		req         simulate.Request
		want        simulate.Outcome
		wantCluster string
		wantStatus  uint32
	}{
		{"an unknown TCP destination is refused", simulate.Request{DestIP: "198.51.100.7", DestPort: 6379}, simulate.Refused, translate.BlackHoleCluster, 0},
		{"an unknown host on an HTTP port gets 502", simulate.Request{DestIP: "198.51.100.7", DestPort: 80, HTTP: true, Host: "evil.example.com", Path: "/"}, simulate.Responded, "", 502},
		{"the external HTTP host is routed to its TLS-originating cluster", simulate.Request{DestIP: "203.0.113.9", DestPort: 80, HTTP: true, Host: "api.payments.example.com", Path: "/charge"}, simulate.Forwarded, "outbound|80||api.payments.example.com", 0},
		{"the external TLS host is matched by SNI", simulate.Request{DestIP: "203.0.113.9", DestPort: 443, SNI: "api.payments.example.com"}, simulate.Forwarded, "outbound|443||api.payments.example.com", 0},
		{"another SNI on 443 is refused", simulate.Request{DestIP: "203.0.113.9", DestPort: 443, SNI: "other.example.com"}, simulate.Refused, translate.BlackHoleCluster, 0},
		{"the external TCP range passes through", simulate.Request{DestIP: "192.0.2.10", DestPort: 5432}, simulate.Forwarded, "outbound|5432||legacy-db.shop.external", 0},
	} {
		r := send(t, s, fe, tt.req)
		if r.Outcome != tt.want || r.Cluster != tt.wantCluster || r.Status != tt.wantStatus {
			t.Errorf("%s: %s cluster %q status %d; want %s %q %d", tt.name, r.Outcome, r.Cluster, r.Status, tt.want, tt.wantCluster, tt.wantStatus)
		}
	}
	s, p = world(t, "basic-http-and-tcp")
	if r := send(t, s, p["shop/frontend-1"], simulate.Request{DestIP: "198.51.100.7", DestPort: 6379}); r.Cluster != translate.PassthroughCluster || r.Outcome != simulate.Forwarded {
		t.Errorf("AllowAny: unknown destination %s via %q, want Forwarded via the passthrough", r.Outcome, r.Cluster)
	}
}

func TestInvalidInputFailsOnlyItsRequests(t *testing.T) {
	s, p := world(t, "httproute-missing-backend")
	if r := send(t, s, p["shop/frontend-1"], get("/gone")); r.Outcome != simulate.Responded || r.Status != 500 {
		t.Errorf("a rule whose only backend is missing: %s %d, want 500", r.Outcome, r.Status)
	}
	failed := 0
	for range 1000 {
		if r := send(t, s, p["shop/frontend-1"], get("/split")); r.Outcome != simulate.Forwarded {
			failed++
		}
	}
	if failed < 50 || failed > 150 {
		t.Errorf("%d of 1000 split requests failed, want about 100 (the missing backend's 10%%)", failed)
	}
	s, p = world(t, "httproute-invalid-regex")
	if r := send(t, s, p["shop/frontend-1"], get("/items/admin")); r.Cluster != "outbound|9080||reviews.shop.svc.cluster.local" {
		t.Errorf("with its route rejected, reviews keeps its default route; got %q", r.Cluster)
	}
}

func TestUnmeshedEndpointsGetPlaintext(t *testing.T) {
	s, p := world(t, "unmeshed-and-app-protocol")
	r := send(t, s, p["shop/frontend-1"], simulate.Request{DestIP: "10.96.0.90", DestPort: 7000})
	if r.Outcome != simulate.Forwarded || r.MTLS {
		t.Errorf("to a pod without a proxy: %s mtls=%v, want plaintext", r.Outcome, r.MTLS)
	}
}

// TestClusterIPPicksTheService: the destination address chooses the
// Service (GAMMA's Service frontend, MeshClusterIPMatching), whatever the
// Host header names: a call to reviews-v1's cluster IP with Host reviews
// goes to reviews-v1, not through reviews' split.
func TestClusterIPPicksTheService(t *testing.T) {
	s, p := world(t, "httproute-consumer-overrides-producer")
	req := get("/")
	req.DestIP, req.Host = "10.96.0.21", "reviews"
	for range 50 {
		r := send(t, s, p["shop/frontend-1"], req)
		if want := "outbound|9080||reviews-v1.shop.svc.cluster.local"; r.Cluster != want || r.Outcome != simulate.Forwarded {
			t.Fatalf("%s to %q via chain %q vhost %q; want %q", r.Outcome, r.Cluster, r.Chain, r.VirtualHost, want)
		}
	}
}

// TestSimulatorKnowsEveryHTTPFilter: every HTTP filter the translator may
// emit (its one ordered list) has a handler in the simulator, so a new
// filter cannot be forgotten there.
func TestSimulatorKnowsEveryHTTPFilter(t *testing.T) {
	known := simulate.HTTPFilterConfigTypes()
	types := translate.HTTPFilterConfigTypes()
	if len(types) == 0 || types[len(types)-1] != "envoy.extensions.filters.http.router.v3.Router" {
		t.Fatalf("filter list %v does not end with the router", types)
	}
	for _, ty := range types {
		if !known[ty] {
			t.Errorf("the simulator has no handler for HTTP filter config %s", ty)
		}
	}
}
