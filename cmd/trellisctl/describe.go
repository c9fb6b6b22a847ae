package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/pkg/analyze"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
	"github.com/trellis-mesh/trellis/pkg/translate/simulate"
)

func newDescribe() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "describe",
		Short: "Explain what the mesh does with something",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usageError(cmd, "name what to describe: request, service or pod")
		},
	}
	cmd.AddCommand(newDescribeRequest(), newDescribeObject("service"), newDescribeObject("pod"))
	return cmd
}

func newDescribeRequest() *cobra.Command {
	var (
		src     = newSource()
		headers []string
		method  string
	)
	cmd := &cobra.Command{
		Use:   "request FROM URL (-f PATH... | --live)",
		Short: "Follow one request through the sidecars, step by step",
		Long: `describe request follows one request from a workload's application through its sidecar
and the server's, on the Envoy configuration Trellis builds for them, and prints each step:
the outbound filter chain, the route that matched (and which HTTPRoute or GRPCRoute rule), the
weighted backends, the endpoint and whether mTLS is used and which identity is required, the
server side's filters and the AccessPolicy rule that allowed or denied the request — the answer
to "why did my request get 403 or 503".

FROM is a workload of the manifests: [KIND/]NAME (Deployment, StatefulSet, DaemonSet, ReplicaSet,
Job, CronJob or Pod) in --namespace. URL is what the application calls: http://HOST[:PORT]/PATH,
HOST a Service name (short, .namespace, .svc or the full name), an IP or an ExternalService host;
tcp://HOST:PORT for a TCP connection. The configuration comes from manifests (-f), as analyze
builds it; endpoints and cluster IPs are stand-ins. With --live it is built from the cluster as
the controller builds it (real pods, cluster IPs and endpoints), and FROM is a pod.`,
		Example: `  trellisctl describe request -f config/samples/demo -n demo deployment/frontend http://reviews/
  trellisctl describe request -f deploy/ -n shop frontend http://reviews:9080/api -H 'x-user: tester' -X POST
  trellisctl describe request --live -n shop frontend-7d9f8-x2x4q http://reviews/`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			hdrs := map[string]string{}
			for _, h := range headers {
				k, v, ok := strings.Cut(h, ":")
				if !ok || strings.TrimSpace(k) == "" {
					return usageError(cmd, fmt.Sprintf("-H %q: write NAME: VALUE", h))
				}
				hdrs[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
			cl, err := src.cluster(cmd)
			if err != nil {
				return err
			}
			return describeRequest(cmd.OutOrStdout(), cl, src.namespace, args[0], args[1], strings.ToUpper(method), hdrs)
		},
	}
	src.add(cmd.Flags(), "namespace of FROM, and of objects that name none")
	cmd.Flags().StringArrayVarP(&headers, "header", "H", nil, "request header NAME: VALUE; repeatable")
	cmd.Flags().StringVarP(&method, "method", "X", "GET", "request method")
	return cmd
}

// describeRequest simulates the request and prints its steps.
func describeRequest(w io.Writer, cl *analyze.Cluster, namespace, from, rawURL, method string, headers map[string]string) error {
	client, err := cl.Workload(namespace, from)
	if err != nil {
		return err
	}
	if client.Mode != model.ProxySidecar {
		return fmt.Errorf("%s has no Envoy sidecar (not injected): its requests leave the pod as the application sends them", from)
	}
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "tcp") {
		return fmt.Errorf("URL %q: write http://HOST[:PORT]/PATH or tcp://HOST:PORT", rawURL)
	}
	port := uint32(80)
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("URL %q: port %q is not a port number", rawURL, p)
		}
		port = uint32(n)
	} else if u.Scheme == "tcp" {
		return fmt.Errorf("URL %q: a tcp:// URL needs a port", rawURL)
	}
	host := u.Hostname()
	dest, how := cl.Resolve(client.Namespace, host)
	if dest == "" {
		where := " in the manifests"
		if cl.Live() {
			where = ""
		}
		return fmt.Errorf("host %q: no Service of that name%s (as seen from namespace %s) and no IP; name a Service, an ExternalService host or an IP", host, where, client.Namespace)
	}
	path := cmp.Or(u.EscapedPath(), "/")
	if u.RawQuery != "" {
		path += "?" + u.RawQuery
	}
	req := simulate.Request{DestIP: dest, DestPort: port, HTTP: u.Scheme == "http", Host: u.Host, Path: path, Method: method, Headers: headers}
	sim, proxies := cl.Simulator()
	self := proxies[client.Namespace+"/"+client.Name]

	fmt.Fprintf(w, "%s %s from %s (identity %s)\n", map[bool]string{true: method, false: "TCP"}[req.HTTP], rawURL, cl.Owner(client), self.ID)
	fmt.Fprintf(w, "  destination  %s → %s, %s\n", host, netip.AddrPortFrom(netip.MustParseAddr(dest), uint16(port)), how)
	res, err := sim.Send(self, req)
	if err != nil {
		return fmt.Errorf("simulate: %w", err)
	}
	if res.Chain == "" {
		fmt.Fprintln(w, "  outbound     no filter chain matches: the connection is closed")
		return nil
	}
	fmt.Fprintf(w, "  outbound     filter chain %s\n", res.Chain)
	if vh := res.VirtualHost; vh != "" || res.Route != nil {
		fmt.Fprintf(w, "  route        virtual host %s", vh)
		if res.Route != nil {
			fmt.Fprintf(w, ", route %s%s", res.Route.Name, routeOrigin(cl, res.Route.Name))
		}
		fmt.Fprintln(w)
		if res.Route != nil {
			for _, l := range routeDetails(res.Route) {
				fmt.Fprintf(w, "               %s\n", l)
			}
		}
	}
	switch res.Outcome {
	case simulate.Responded:
		fmt.Fprintf(w, "  result       the client's sidecar answers %d itself%s\n", res.Status, respondedWhy(res))
		if body := strings.TrimSpace(res.Route.GetDirectResponse().GetBody().GetInlineString()); body != "" {
			fmt.Fprintf(w, "  body         %s\n", body)
		}
		return nil
	case simulate.Redirected:
		fmt.Fprintf(w, "  result       redirect: %s\n", redirectText(res.Redirect))
		return nil
	}
	if len(res.Clusters) > 1 {
		var parts []string
		for _, c := range slices.Sorted(maps.Keys(res.Clusters)) {
			parts = append(parts, fmt.Sprintf("%s weight %d", c, res.Clusters[c]))
		}
		fmt.Fprintf(w, "  backends     %s; this request: %s\n", strings.Join(parts, ", "), res.Cluster)
	} else if res.Cluster != "" {
		fmt.Fprintf(w, "  cluster      %s\n", res.Cluster)
	}
	if res.Cluster == translate.PassthroughCluster {
		if svc := cl.ServiceAt(dest); svc != nil {
			// Scoping left the Service out of this sidecar's configuration:
			// the call leaves in plaintext, as to any unknown address, and
			// reaches a pod through kube-proxy.
			fmt.Fprintf(w, "  note         Service %s/%s is not in this sidecar's configuration: a sidecar gets only the Services its identity may call, and no Allow AccessPolicy on it (or defaultAccess: Deny) lets this one\n", svc.Namespace, svc.Name)
			return serverOfPassthrough(w, proxies, cl, svc, port, req, res.Route != nil)
		}
	}
	if res.Endpoint != "" {
		tls := "plaintext"
		if res.MTLS {
			tls = "mTLS"
			if len(res.SANs) > 0 {
				tls += ", server must be " + strings.Join(res.SANs, " or ")
			}
		}
		fmt.Fprintf(w, "  endpoint     %s%s, %s\n", res.Endpoint, cl.EndpointOwner(res.Endpoint), tls)
	}
	if res.Server != nil {
		s := res.Server
		peer := "no client certificate (plaintext)"
		if s.Peer != "" {
			peer = "caller seen as " + s.Peer
		}
		fmt.Fprintf(w, "  server       inbound chain %s, %s\n", cmp.Or(s.Chain, "(none)"), peer)
		if len(s.Filters) > 0 {
			fmt.Fprintf(w, "               HTTP filters: %s\n", strings.Join(s.Filters, ", "))
		}
		switch {
		case s.Outcome == simulate.Denied && s.DeniedBy == "deny":
			fmt.Fprintf(w, "               AccessPolicy: denied by Deny rule %s\n", s.Policy)
		case s.Outcome == simulate.Denied:
			fmt.Fprintln(w, "               AccessPolicy: denied: no Allow rule matches this caller and request")
		case s.Policy != "":
			fmt.Fprintf(w, "               AccessPolicy: allowed by %s\n", s.Policy)
		}
	}
	switch res.Outcome {
	case simulate.Forwarded:
		if res.Server != nil {
			fmt.Fprintf(w, "  result       delivered to the application (%s)\n", res.Server.Cluster)
		} else {
			fmt.Fprintln(w, "  result       forwarded; the destination has no sidecar (outside the mesh, or not injected), so no server-side policy applies")
		}
	case simulate.Denied:
		if req.HTTP {
			fmt.Fprintln(w, "  result       403 Forbidden (RBAC: access denied), from the server's sidecar")
		} else {
			fmt.Fprintln(w, "  result       the server's sidecar closes the connection (RBAC)")
		}
	case simulate.Refused:
		fmt.Fprintln(w, "  result       connection refused or closed (no such destination, or plaintext to a Strict server)")
	case simulate.HandshakeFailed:
		fmt.Fprintln(w, "  result       TLS handshake fails: the server requires a client certificate")
	}
	return nil
}

// routeOrigin names the route rule a route comes from (its name is
// namespace/name/rule/i/match/j for HTTPRoute and GRPCRoute rules).
// serverOfPassthrough follows a plaintext call that kube-proxy sends to
// one of the Service's pods.
func serverOfPassthrough(w io.Writer, proxies map[string]*simulate.Proxy, cl *analyze.Cluster, svc *model.Service, port uint32, req simulate.Request, viaHCM bool) error {
	for _, e := range svc.Endpoints[int32(port)] {
		server := proxies[svc.Namespace+"/"+e.Pod]
		fmt.Fprintf(w, "  endpoint     %s%s via kube-proxy, plaintext\n", netip.AddrPortFrom(netip.MustParseAddr(e.IP), uint16(e.Port)), cl.EndpointOwner(netip.AddrPortFrom(netip.MustParseAddr(e.IP), uint16(e.Port)).String()))
		if server == nil {
			fmt.Fprintln(w, "  result       delivered to the application (the pod has no sidecar)")
			return nil
		}
		in, err := simulate.Inbound(server, simulate.InboundRequest{DestPort: uint32(e.Port), HTTP: req.HTTP, Path: req.Path, Method: req.Method, Headers: req.Headers})
		if err != nil {
			return fmt.Errorf("simulate: %w", err)
		}
		switch {
		case in.Outcome == simulate.Refused && viaHCM:
			fmt.Fprintln(w, "  result       503 from the client's sidecar (upstream reset): the server's sidecar refuses plaintext (Strict mTLS)")
		case in.Outcome == simulate.Refused:
			fmt.Fprintln(w, "  result       connection reset: the server's sidecar refuses plaintext (Strict mTLS)")
		case in.Outcome == simulate.Denied:
			fmt.Fprintln(w, "  result       403 from the server's sidecar: a plaintext caller has no identity for AccessPolicy")
		default:
			fmt.Fprintf(w, "  result       %s by the server's sidecar (%s)\n", strings.ToLower(string(in.Outcome)), in.Chain)
		}
		return nil
	}
	fmt.Fprintln(w, "  result       no endpoint: connection refused")
	return nil
}

func routeOrigin(cl *analyze.Cluster, name string) string {
	parts := strings.Split(name, "/")
	if len(parts) == 6 && parts[2] == "rule" && parts[4] == "match" {
		return fmt.Sprintf(" (%s %s/%s rules[%s].matches[%s])", cl.RouteKind(parts[0], parts[1]), parts[0], parts[1], parts[3], parts[5])
	}
	if name == "default" {
		return " (the destination's default route: no HTTPRoute or GRPCRoute rule applies)"
	}
	return ""
}

func routeDetails(r *routev3.Route) []string {
	a := r.GetRoute()
	if a == nil {
		return nil
	}
	var out []string
	if t := a.GetTimeout(); t != nil {
		if d := t.AsDuration(); d > 0 {
			out = append(out, "timeout "+d.String())
		} else {
			out = append(out, "no timeout")
		}
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		s := fmt.Sprintf("retries: up to %d on %s", rp.GetNumRetries().GetValue(), rp.GetRetryOn())
		if codes := rp.GetRetriableStatusCodes(); len(codes) > 0 {
			s += fmt.Sprintf(" (status %v)", codes)
		}
		if pt := rp.GetPerTryTimeout(); pt != nil {
			s += ", per try " + pt.AsDuration().String()
		}
		out = append(out, s)
	}
	if m := a.GetRequestMirrorPolicies(); len(m) > 0 {
		for _, p := range m {
			out = append(out, "mirrored to "+p.GetCluster())
		}
	}
	if pr := a.GetPrefixRewrite(); pr != "" {
		out = append(out, "path prefix rewritten to "+pr)
	}
	return out
}

func respondedWhy(res *simulate.Result) string {
	switch {
	case res.Status == 404:
		return " (no route matches the request)"
	case res.Status == 502 && res.VirtualHost == "block_all":
		return " (outboundPolicy RegistryOnly: no Service or ExternalService matches the host)"
	case res.Status == 503:
		return " (no healthy endpoint)"
	case res.Status == 403 && strings.HasPrefix(res.Chain, "denied|"):
		return " (scoping: the Service is not in this sidecar's configuration, its identity may not call it)"
	}
	return ""
}

func redirectText(r *routev3.RedirectAction) string {
	var parts []string
	if h := r.GetHostRedirect(); h != "" {
		parts = append(parts, "host "+h)
	}
	if p := r.GetPathRedirect(); p != "" {
		parts = append(parts, "path "+p)
	}
	if p := r.GetPrefixRewrite(); p != "" {
		parts = append(parts, "prefix "+p)
	}
	if s := r.GetSchemeRedirect(); s != "" {
		parts = append(parts, "scheme "+s)
	}
	return fmt.Sprintf("%s (%s)", strings.Join(parts, ", "), r.GetResponseCode())
}
