package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/pkg/analyze"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// newDescribeObject is describe service NAME and describe pod NAME: what
// the mesh makes of the object, from manifests (-f) or the cluster (--live).
func newDescribeObject(kind string) *cobra.Command {
	src := newSource()
	long := map[string]string{
		"service": `describe service shows what the mesh makes of a Service: each port with the protocol it is
treated as (and why HTTP features do not apply to a TCP port), its endpoints with their pods and
whether they are meshed, the routes attached to it (producer, and consumer routes by client
namespace), its BackendPolicy, the AccessPolicies that target it and everything the analysis
reports about it.`,
		"pod": `describe pod shows what the mesh makes of a pod: its proxy (Envoy sidecar, proxyless gRPC or
none), its SPIFFE identity, the Services it backs (its inbound ports and their protocols), the
AccessPolicies its inbound side enforces, and everything the analysis reports about it. From
manifests, a workload ([KIND/]NAME) stands for its pods.`,
	}[kind]
	cmd := &cobra.Command{
		Use:   kind + " NAME (-f PATH... | --live)",
		Short: "Show what the mesh makes of a " + map[string]string{"service": "Service", "pod": "pod"}[kind],
		Long:  long,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, err := src.cluster(cmd)
			if err != nil {
				return err
			}
			if kind == "service" {
				return describeService(cmd.OutOrStdout(), cl, src.namespace, args[0])
			}
			return describePod(cmd.OutOrStdout(), cl, src.namespace, args[0])
		},
	}
	src.add(cmd.Flags(), "namespace of NAME, and of objects that name none")
	return cmd
}

func describeService(w io.Writer, cl *analyze.Cluster, namespace, name string) error {
	s := cl.Mesh.Service(namespace, name)
	if s == nil {
		return fmt.Errorf("no Service %s/%s", namespace, name)
	}
	fmt.Fprintf(w, "Service %s/%s\n", namespace, name)
	fmt.Fprintf(w, "  host         %s\n", s.Hostname())
	fmt.Fprintf(w, "  cluster IPs  %s\n", cmp.Or(strings.Join(s.ClusterIPs, ", "), "none (headless)"))
	for _, p := range s.Ports {
		note := ""
		if p.Protocol == model.ProtocolTCP {
			note = " (routes, retries and L7 policy do not apply; set appProtocol to change it)"
		}
		fmt.Fprintf(w, "  port %d %-6s → %s, treated as %s%s\n", p.Port, cmp.Or(p.Name, "-"), p.TargetPort.String(), p.Protocol, note)
		eps := s.Endpoints[p.Port]
		if len(eps) == 0 {
			fmt.Fprintln(w, "      no endpoints: clients get 503 (no healthy upstream)")
		}
		for _, e := range eps {
			state := "ready"
			switch {
			case e.Terminating:
				state = "terminating"
			case !e.Ready:
				state = "not ready"
			}
			mesh := "meshed (" + string(e.Mesh) + ")"
			if e.Mesh == model.ProxyNone {
				mesh = "NOT meshed: no mTLS, no server-side policy"
			}
			fmt.Fprintf(w, "      %s:%d  %s  %s  %s\n", e.IP, e.Port, cmp.Or(e.Pod, "-"), state, mesh)
		}
	}
	fmt.Fprintln(w, "  routes")
	printRoutes(w, "producer route: every client", s.ProducerRoutes)
	for _, ns := range slices.Sorted(maps.Keys(s.ConsumerRoutes)) {
		printRoutes(w, "consumer route: clients in "+ns, s.ConsumerRoutes[ns])
	}
	if len(s.ProducerRoutes)+len(s.ConsumerRoutes) == 0 {
		fmt.Fprintln(w, "    none: requests go to the Service's own endpoints")
	}
	if s.Policy != nil {
		fmt.Fprintf(w, "  BackendPolicy %s/%s\n", s.Policy.Namespace, s.Policy.Name)
	} else {
		fmt.Fprintln(w, "  BackendPolicy none (defaults)")
	}
	if len(s.AccessPolicies) == 0 {
		deny := ""
		if cl.Mesh.Settings.DenyByDefault {
			deny = ": MeshConfig defaultAccess is Deny, so no request is accepted"
		}
		fmt.Fprintf(w, "  AccessPolicies none%s\n", deny)
	}
	for _, ap := range s.AccessPolicies {
		fmt.Fprintf(w, "  AccessPolicy %s/%s (%s, %d rules)\n", ap.Namespace, ap.Name, map[bool]string{true: "Deny", false: "Allow"}[ap.Deny], len(ap.Rules))
	}
	// Its own findings, and those of what is attached to it.
	related := []model.Ref{{Kind: "Service", Namespace: namespace, Name: name}}
	for _, r := range s.ProducerRoutes {
		related = append(related, r.Ref())
	}
	for _, rs := range s.ConsumerRoutes {
		for _, r := range rs {
			related = append(related, r.Ref())
		}
	}
	if s.Policy != nil {
		related = append(related, model.Ref{Kind: "BackendPolicy", Namespace: s.Policy.Namespace, Name: s.Policy.Name})
	}
	for _, ap := range s.AccessPolicies {
		related = append(related, model.Ref{Kind: "AccessPolicy", Namespace: ap.Namespace, Name: ap.Name})
	}
	printFindings(w, cl, func(r model.Ref) bool { return slices.Contains(related, r) })
	return nil
}

func printRoutes(w io.Writer, what string, rs []*model.Route) {
	for _, r := range rs {
		port := "every port"
		if r.Port != 0 {
			port = fmt.Sprintf("port %d", r.Port)
		}
		fmt.Fprintf(w, "    %s %s: %s, %d rules; %s\n", r.Kind, r.Namespace+"/"+r.Name, port, len(r.Rules), what)
	}
}

func describePod(w io.Writer, cl *analyze.Cluster, namespace, name string) error {
	wl, err := cl.Workload(namespace, name)
	if err != nil {
		if wl = cl.Mesh.Workload(namespace, name); wl == nil {
			return err
		}
	}
	fmt.Fprintf(w, "%s\n", cl.Owner(wl))
	fmt.Fprintf(w, "  IPs             %s\n", cmp.Or(strings.Join(wl.IPs, ", "), "none yet"))
	proxy := map[model.ProxyMode]string{model.ProxySidecar: "Envoy sidecar", model.ProxyGRPC: "proxyless gRPC (the app's own xDS client)", model.ProxyNone: "none: not in the mesh (no mTLS, policies or routes on its side)"}[wl.Mode]
	fmt.Fprintf(w, "  proxy           %s\n", proxy)
	fmt.Fprintf(w, "  identity        %s\n", cl.Mesh.SPIFFEID(wl.Namespace, wl.ServiceAccount))
	if wl.Mode != model.ProxyNone {
		fmt.Fprintf(w, "  class           %s (proxies of one class share their configuration)\n", translate.ClassKey(cl.Mesh, wl))
	}
	backs := false
	for _, s := range cl.Mesh.Services {
		for _, p := range s.Ports {
			for _, e := range s.Endpoints[p.Port] {
				if e.Pod != wl.Name || s.Namespace != wl.Namespace {
					continue
				}
				backs = true
				var aps []string
				for _, ap := range s.AccessPolicies {
					aps = append(aps, ap.Namespace+"/"+ap.Name)
				}
				fmt.Fprintf(w, "  backs           Service %s/%s port %d → %d (%s); AccessPolicies: %s\n", s.Namespace, s.Name, p.Port, e.Port, p.Protocol, cmp.Or(strings.Join(aps, ", "), "none"))
			}
		}
	}
	if !backs {
		fmt.Fprintln(w, "  backs           no Service (no inbound port is configured)")
	}
	printFindings(w, cl, func(r model.Ref) bool {
		return r.Namespace == namespace && (r.Name == wl.Name || cl.Owner(wl) == r.String())
	})
	return nil
}

func printFindings(w io.Writer, cl *analyze.Cluster, about func(model.Ref) bool) {
	n := 0
	for _, f := range cl.Findings {
		if !about(f.Object) {
			continue
		}
		if n == 0 {
			fmt.Fprintln(w, "  findings")
		}
		n++
		mark := map[analyze.Severity]string{analyze.Error: "✘", analyze.Warning: "!"}[f.Severity]
		fmt.Fprintf(w, "    %s %s %s [%s] %s\n", mark, f.Object.String(), cmp.Or(f.Field, "-"), f.Reason, f.Message)
	}
	if n == 0 {
		fmt.Fprintln(w, "  findings        none")
	}
}
