package translate

import (
	"slices"
	"strconv"
	"strings"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// Origins returns the objects a resource served to proxy comes from, by
// the names the translator gives (names.go): a Service port's cluster,
// endpoints and route table come from the Service, its BackendPolicy and
// the routes attached to it; an ExternalService's from the ExternalService;
// the inbound listener from the Services the proxy backs and their
// AccessPolicies. It is how a proxy's rejection (NACK) is traced back to
// what a user wrote; names it cannot trace give nil.
func Origins(mesh *model.Mesh, proxy *model.Workload, typeURL, name string) []model.Ref {
	if mesh == nil {
		return nil
	}
	var out []model.Ref
	add := func(r model.Ref) {
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	switch {
	case strings.HasPrefix(name, "outbound|"):
		port, host, _ := strings.Cut(strings.TrimPrefix(name, "outbound|"), "||")
		number, err := strconv.ParseInt(port, 10, 32)
		if err != nil {
			return nil
		}
		if host == "" || host == "external-http" {
			// outbound|<port> (the Host-routed ExternalServices' table) and
			// its filter chain.
			for _, es := range mesh.External {
				for _, p := range es.Ports {
					if p.Number == int32(number) && p.Protocol == model.ExternalHTTP {
						add(model.Ref{Kind: "ExternalService", Namespace: es.Namespace, Name: es.Name})
					}
				}
			}
			return out
		}
		if s := serviceByHost(mesh, host); s != nil {
			add(model.Ref{Kind: "Service", Namespace: s.Namespace, Name: s.Name})
			if s.Policy != nil && typeURL != resource.RouteType {
				add(model.Ref{Kind: "BackendPolicy", Namespace: s.Policy.Namespace, Name: s.Policy.Name})
			}
			if typeURL == resource.RouteType {
				ns := ""
				if proxy != nil {
					ns = proxy.Namespace
				}
				for _, r := range s.RoutesFor(ns) {
					if r.Port == 0 || r.Port == int32(number) {
						add(r.Ref())
					}
				}
			}
			return out
		}
		for _, es := range mesh.External {
			if slices.Contains(es.Hosts, host) || host == es.Name+"."+es.Namespace+".external" {
				add(model.Ref{Kind: "ExternalService", Namespace: es.Namespace, Name: es.Name})
			}
		}
		return out
	case name == InboundListenerName || strings.HasPrefix(name, "inbound|"):
		if proxy == nil {
			return nil
		}
		t := &translator{mesh: mesh, proxy: proxy}
		for _, ip := range t.inboundPorts() {
			if name != InboundListenerName && name != InboundClusterName(ip.port) {
				continue
			}
			for _, s := range ip.services {
				add(model.Ref{Kind: "Service", Namespace: s.Namespace, Name: s.Name})
				if name == InboundListenerName {
					for _, ap := range s.AccessPolicies {
						add(model.Ref{Kind: "AccessPolicy", Namespace: ap.Namespace, Name: ap.Name})
					}
				}
			}
		}
		return out
	case name == OutboundListenerName:
		for _, es := range mesh.External {
			add(model.Ref{Kind: "ExternalService", Namespace: es.Namespace, Name: es.Name})
		}
		add(model.Ref{Kind: "MeshConfig", Name: "default"})
		return out
	}
	return nil
}

func serviceByHost(mesh *model.Mesh, host string) *model.Service {
	name, rest, ok := strings.Cut(host, ".")
	if !ok {
		return nil
	}
	ns, suffix, _ := strings.Cut(rest, ".")
	if suffix != "svc.cluster.local" {
		return nil
	}
	return mesh.Service(ns, name)
}
