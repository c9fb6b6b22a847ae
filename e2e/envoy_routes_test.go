package e2e_test

import (
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// setupHTTPVersions deploys httpecho web v1 and v2 (one replica each) behind
// Service web, Services web-v1 and web-v2 for each version, a mirror
// target, and a meshed client.
func setupHTTPVersions(t *testing.T, v2args ...string) string {
	t.Helper()
	ns := meshNamespace(t)
	v1, v2, mirror := httpService(ns, "web-v1"), httpService(ns, "web-v2"), httpService(ns, "mirror")
	v1.Spec.Selector = map[string]string{"app": "web", "version": "v1"}
	v2.Spec.Selector = map[string]string{"app": "web", "version": "v2"}
	create(t, serviceAccount(ns, "web"), serviceAccount(ns, "mirror"), serviceAccount(ns, "client"),
		httpService(ns, "web"), v1, v2, mirror,
		httpDeployment(ns, "web", "v1", 1), httpDeployment(ns, "web", "v2", 1, v2args...), httpDeployment(ns, "mirror", "v1", 1),
		httpClientPod(ns, "client", "client", true))
	waitEndpoints(t, ns, "web", 2)
	waitEndpoints(t, ns, "mirror", 1)
	waitRunning(t, ns, "client")
	return ns
}

func httpBackend(name string, weight int32) gwv1.HTTPBackendRef {
	return gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{Weight: ptr.To(weight), BackendObjectReference: gwv1.BackendObjectReference{
		Name: gwv1.ObjectName(name), Port: ptr.To(gwv1.PortNumber(80)),
	}}}
}

func httpRoute(ns, name, parent string, rules ...gwv1.HTTPRouteRule) *gwv1.HTTPRoute {
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: gwv1.ObjectName(parent), Port: ptr.To(gwv1.PortNumber(80))}}},
			Rules:           rules,
		},
	}
}

func pathPrefix(p string) []gwv1.HTTPRouteMatch {
	return []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr.To(gwv1.PathMatchPathPrefix), Value: ptr.To(p)}}}
}

// TestEnvoyHTTPRoute: one HTTPRoute on Service web, consumed by the client's
// Envoy sidecar, with every rule checked on what the apps see: an 80/20
// split over 2,000 requests, header, query and method matches, request and
// response header modifiers, a redirect, a URL rewrite, a request mirror
// (the mirror's app receives the copy), a request timeout and retries.
func TestEnvoyHTTPRoute(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTPVersions(t)
	exact := func(p string) *gwv1.HTTPPathMatch {
		return &gwv1.HTTPPathMatch{Type: ptr.To(gwv1.PathMatchExact), Value: ptr.To(p)}
	}
	v2only := []gwv1.HTTPBackendRef{httpBackend("web-v2", 1)}
	route := httpRoute(ns, "web", "web",
		gwv1.HTTPRouteRule{Matches: []gwv1.HTTPRouteMatch{{Headers: []gwv1.HTTPHeaderMatch{{Name: "x-version", Value: "v2"}}}}, BackendRefs: v2only},
		gwv1.HTTPRouteRule{Matches: []gwv1.HTTPRouteMatch{{QueryParams: []gwv1.HTTPQueryParamMatch{{Name: "canary", Value: "yes"}}}}, BackendRefs: v2only},
		gwv1.HTTPRouteRule{Matches: []gwv1.HTTPRouteMatch{{Method: ptr.To(gwv1.HTTPMethodDelete)}}, BackendRefs: v2only},
		gwv1.HTTPRouteRule{
			Matches: []gwv1.HTTPRouteMatch{{Path: exact("/headers")}},
			Filters: []gwv1.HTTPRouteFilter{
				{Type: gwv1.HTTPRouteFilterRequestHeaderModifier, RequestHeaderModifier: &gwv1.HTTPHeaderFilter{
					Set: []gwv1.HTTPHeader{{Name: "x-set", Value: "set-by-route"}}, Add: []gwv1.HTTPHeader{{Name: "x-added", Value: "added"}}, Remove: []string{"x-drop"},
				}},
				{Type: gwv1.HTTPRouteFilterResponseHeaderModifier, ResponseHeaderModifier: &gwv1.HTTPHeaderFilter{Set: []gwv1.HTTPHeader{{Name: "x-resp", Value: "from-route"}}}},
			},
			BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)},
		},
		gwv1.HTTPRouteRule{
			Matches: []gwv1.HTTPRouteMatch{{Path: exact("/old")}},
			Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterRequestRedirect, RequestRedirect: &gwv1.HTTPRequestRedirectFilter{
				Path: &gwv1.HTTPPathModifier{Type: gwv1.FullPathHTTPPathModifier, ReplaceFullPath: ptr.To("/new")}, StatusCode: ptr.To(301),
			}}},
		},
		gwv1.HTTPRouteRule{
			Matches: pathPrefix("/api"),
			Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterURLRewrite, URLRewrite: &gwv1.HTTPURLRewriteFilter{
				Path: &gwv1.HTTPPathModifier{Type: gwv1.PrefixMatchHTTPPathModifier, ReplacePrefixMatch: ptr.To("/v2/api")},
			}}},
			BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)},
		},
		gwv1.HTTPRouteRule{
			Matches: pathPrefix("/mirrored"),
			Filters: []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterRequestMirror, RequestMirror: &gwv1.HTTPRequestMirrorFilter{
				BackendRef: gwv1.BackendObjectReference{Name: "mirror", Port: ptr.To(gwv1.PortNumber(80))},
			}}},
			BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)},
		},
		gwv1.HTTPRouteRule{
			Matches:     pathPrefix("/slow"),
			Timeouts:    &gwv1.HTTPRouteTimeouts{Request: ptr.To(gwv1.Duration("500ms"))},
			BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)},
		},
		gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 80), httpBackend("web-v2", 20)}},
	)
	// web-ports serves web v1 on ports 80 and 81; its route is attached to
	// port 80 only (parentRef port). HTTPRoute retry: TestEnvoyHTTPRouteRetry.
	ports := httpService(ns, "web-ports")
	ports.Spec.Selector = map[string]string{"app": "web", "version": "v1"}
	ports.Spec.Ports = append(ports.Spec.Ports[:1:1], corev1.ServicePort{Name: "http-alt", Port: 81, TargetPort: intstr.FromInt32(httpPort), AppProtocol: ptr.To("http")})
	create(t, ports, route,
		httpRoute(ns, "web-ports", "web-ports", gwv1.HTTPRouteRule{
			Filters:     []gwv1.HTTPRouteFilter{{Type: gwv1.HTTPRouteFilterResponseHeaderModifier, ResponseHeaderModifier: &gwv1.HTTPHeaderFilter{Set: []gwv1.HTTPHeader{{Name: "x-route", Value: "port-80"}}}}},
			BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)},
		}))
	url := func(p string) string { return "http://web" + p }
	call := func(args ...string) func() []httpResult {
		return func() []httpResult { return httpCall(t, ns, "client", args...) }
	}
	// Programmed once the header rule routes to v2.
	eventuallyHTTP(t, "route programmed", call("--url", url("/"), "--header", "x-version: v2", "--count", "5"), func(rs []httpResult) (bool, string) {
		c := 0
		for _, r := range rs {
			if r.Code == 200 && r.Version == "v2" {
				c++
			}
		}
		return c == len(rs), fmt.Sprintf("%d/%d to v2 (%s)", c, len(rs), firstHTTPError(rs, 200))
	})

	versions := func(rs []httpResult) map[string]int {
		by := map[string]int{}
		for _, r := range rs {
			if r.Code == 200 {
				by[r.Version]++
			} else {
				by[fmt.Sprintf("code %d", r.Code)]++
			}
		}
		return by
	}
	t.Run("80/20 split over 2000 requests", func(t *testing.T) {
		// As TestTrafficSplit: in place once 200 requests look like it.
		eventually(t, "split programmed", func() (bool, string) {
			by := versions(httpCall(t, ns, "client", "--url", url("/split"), "--count", "200", "--concurrency", "4"))
			return by["v1"] > 120 && by["v1"] < 190, fmt.Sprint(by)
		})
		rs := httpCall(t, ns, "client", "--url", url("/split"), "--count", "2000", "--concurrency", "4")
		by := versions(rs)
		share := float64(by["v1"]) / 2000
		t.Logf("%v: v1 share %.1f %% (want 80 ± 5)", by, share*100)
		if by["v1"]+by["v2"] != 2000 || math.Abs(share-0.8) > 0.05 {
			t.Errorf("split %v (%s)", by, firstHTTPError(rs, 200))
		}
	})
	for _, m := range []struct {
		name string
		args []string
	}{
		{"header x-version: v2", []string{"--url", url("/"), "--header", "x-version: v2"}},
		{"query canary=yes", []string{"--url", url("/?canary=yes")}},
		{"method DELETE", []string{"--url", url("/"), "--method", "DELETE"}},
	} {
		t.Run("match "+m.name+" goes to v2", func(t *testing.T) {
			by := versions(httpCall(t, ns, "client", append(m.args, "--count", "50")...))
			t.Logf("%v", by)
			if by["v2"] != 50 {
				t.Errorf("%s: %v, want all 50 on v2", m.name, by)
			}
		})
	}
	t.Run("request and response header modifiers", func(t *testing.T) {
		rs := httpCall(t, ns, "client", "--url", url("/headers"), "--header", "x-set: from-client", "--header", "x-drop: please", "--header", "x-added: client")
		r := rs[0]
		if r.Code != 200 {
			t.Fatalf("code %d %s", r.Code, r.Error)
		}
		h := r.Body.Headers
		t.Logf("app saw x-set=%v x-added=%v x-drop=%v; response x-resp=%q", h["x-set"], h["x-added"], h["x-drop"], r.RespHeaders["x-resp"])
		if strings.Join(h["x-set"], ",") != "set-by-route" || !strings.Contains(strings.Join(h["x-added"], ","), "added") || len(h["x-drop"]) != 0 || r.RespHeaders["x-resp"] != "from-route" {
			t.Errorf("headers not modified as the route says")
		}
	})
	t.Run("redirect answers 301 with the new path", func(t *testing.T) {
		r := httpCall(t, ns, "client", "--url", url("/old"))[0]
		t.Logf("%d location %q", r.Code, r.RespHeaders["location"])
		if r.Code != 301 || !strings.HasSuffix(r.RespHeaders["location"], "/new") {
			t.Errorf("got %d location %q", r.Code, r.RespHeaders["location"])
		}
	})
	t.Run("URL rewrite replaces the prefix", func(t *testing.T) {
		r := httpCall(t, ns, "client", "--url", url("/api/items?id=7"))[0]
		if r.Code != 200 || r.Body.Path != "/v2/api/items" || r.Body.Query != "id=7" {
			t.Errorf("app saw %d %s?%s, want /v2/api/items?id=7", r.Code, r.Body.Path, r.Body.Query)
		}
	})
	t.Run("mirror: the mirror backend receives a copy", func(t *testing.T) {
		rs := httpCall(t, ns, "client", "--url", url("/mirrored/x"), "--count", "10")
		if c := codes(rs); c[200] != 10 || rs[0].Body.Pod == "" || !strings.HasPrefix(rs[0].Pod, "web-v1") {
			t.Fatalf("primary answers %v from %s", c, rs[0].Pod)
		}
		eventually(t, "mirror saw the copies", func() (bool, string) {
			n := 0
			for _, d := range podDirs(ns, "mirror-v1") {
				b := readFile(d + "/app.log")
				n += strings.Count(b, "/mirrored/x")
			}
			return n >= 10, fmt.Sprintf("mirror logged %d requests", n)
		})
	})
	t.Run("parentRef port: the route applies to port 80, not 81", func(t *testing.T) {
		eventuallyHTTP(t, "port 80 routed", call("--url", "http://web-ports/", "--count", "5"), func(rs []httpResult) (bool, string) {
			n := 0
			for _, r := range rs {
				if r.Code == 200 && r.RespHeaders["x-route"] == "port-80" {
					n++
				}
			}
			return n == len(rs), fmt.Sprintf("%d/%d with x-route (%s)", n, len(rs), firstHTTPError(rs, 200))
		})
		rs := httpCall(t, ns, "client", "--url", "http://web-ports:81/", "--count", "20")
		n := 0
		for _, r := range rs {
			if r.Code == 200 && r.RespHeaders["x-route"] == "" {
				n++
			}
		}
		t.Logf("port 80: 5/5 with the route's header; port 81: %d/20 answered without it", n)
		if n != 20 {
			t.Errorf("port 81: %d/20 answered 200 without the port-80 route's header (%s)", n, firstHTTPError(rs, 200))
		}
	})
	t.Run("request timeout: 504 after 500 ms against a 3 s backend", func(t *testing.T) {
		start := time.Now()
		r := httpCall(t, ns, "client", "--url", url("/slow?delay=3s"))[0]
		took := time.Since(start)
		t.Logf("%d after %s", r.Code, took.Round(time.Millisecond))
		if r.Code != 504 {
			t.Errorf("code %d, want 504 (upstream request timeout)", r.Code)
		}
	})
}

// appAnswered: every response came from the app (a 200, or its own 503
// with its JSON body), none from the client's sidecar.
func appAnswered(rs []httpResult) (bool, string) {
	for _, r := range rs {
		if r.Body == nil || (r.Code != 200 && r.Code != 503) {
			return false, fmt.Sprintf("request %d: %d %s%s", r.I, r.Code, r.Error, r.Raw)
		}
	}
	return true, ""
}

// TestEnvoyHTTPRouteRetry: Gateway API's HTTPRoute retry (experimental
// channel; the e2e installs that channel's CRDs) through the client's Envoy
// sidecar, against a backend failing every 2nd request with 503: without a
// route about half the requests fail, with retry {attempts: 2, codes: [503]}
// none does and the client's sidecar counts the retries.
func TestEnvoyHTTPRouteRetry(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "flaky", 1, "--fail-every=2")
	// Until the client's sidecar has the endpoint, Envoy itself answers
	// 503 (no healthy upstream); count only once every answer is the app's.
	rs := eventuallyHTTP(t, "flaky reachable", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://flaky/", "--count", "40") }, appAnswered)
	if c := codes(rs); c[503] < 15 || c[200] < 15 {
		t.Fatalf("without a route: %v, the app should fail every 2nd request", c)
	}
	t.Logf("without a route: %v, every answer from the app", codes(rs))
	route := httpRoute(ns, "flaky", "flaky", gwv1.HTTPRouteRule{
		Retry:       &gwv1.HTTPRouteRetry{Attempts: ptr.To(2), Codes: []gwv1.HTTPRouteRetryStatusCode{503}},
		BackendRefs: []gwv1.HTTPBackendRef{httpBackend("flaky", 1)},
	})
	create(t, route)
	var got gwv1.HTTPRoute
	if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKeyFromObject(route), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Spec.Rules) != 1 || got.Spec.Rules[0].Retry == nil {
		t.Fatalf("the apiserver dropped the rule's retry (standard-channel CRDs prune it; the e2e installs the experimental ones): %+v", got.Spec.Rules)
	}
	before := statSum(scrape(t, ns, "client"), "envoy_cluster_upstream_rq_retry", "outbound|80||flaky."+ns)
	rs = eventuallyHTTP(t, "retries", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://flaky/", "--count", "100") }, allCode(200))
	retries := statSum(scrape(t, ns, "client"), "envoy_cluster_upstream_rq_retry", "outbound|80||flaky."+ns) - before
	t.Logf("with retry {attempts: 2, codes: [503]}: %d/100 succeeded; the client's sidecar retried %v times", codes(rs)[200], retries)
	if retries < 30 {
		t.Errorf("the client's sidecar counted %v retries for 100 requests against a backend failing every 2nd one", retries)
	}
}
