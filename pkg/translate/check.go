package translate

import (
	"errors"
	"fmt"
	"strings"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// validator is what go-control-plane's generated types implement.
type validator interface{ ValidateAll() error }

// Validate runs protoc-gen-validate's ValidateAll on every resource and on
// every message packed in an Any inside it (Envoy validates those too when
// it instantiates the extension).
func (r *Resources) Validate() error {
	var errs []error
	check := func(kind, name string, m proto.Message) {
		if err := validateDeep(m); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", kind, name, err))
		}
	}
	for _, l := range r.Listeners {
		check("listener", l.Name, l)
	}
	for _, rc := range r.Routes {
		check("route", rc.Name, rc)
	}
	for _, c := range r.Clusters {
		check("cluster", c.Name, c)
	}
	for _, e := range r.Endpoints {
		check("endpoints", e.ClusterName, e)
	}
	return errors.Join(errs...)
}

func validateDeep(m proto.Message) error {
	var errs []error
	if v, ok := m.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			errs = append(errs, err)
		}
	}
	walkAnys(m.ProtoReflect(), func(a *anypb.Any) {
		inner, err := a.UnmarshalNew()
		if err != nil {
			errs = append(errs, fmt.Errorf("typed_config %s: %w", a.TypeUrl, err))
			return
		}
		if err := validateDeep(inner); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", a.TypeUrl, err))
		}
	})
	return errors.Join(errs...)
}

// walkAnys calls f for every Any directly reachable from m (not inside
// another Any).
func walkAnys(m protoreflect.Message, f func(*anypb.Any)) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		visit := func(v protoreflect.Value) {
			msg := v.Message()
			if a, ok := msg.Interface().(*anypb.Any); ok {
				f(a)
				return
			}
			walkAnys(msg, f)
		}
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				visit(l.Get(i))
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				visit(mv)
				return true
			})
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
			visit(v)
		}
		return true
	})
}

// CheckReferences finds what ValidateAll cannot see and a real Envoy would
// NACK or mis-route: an RDS name no route configuration answers, a route
// to a cluster that does not exist, an EDS cluster without endpoints, an SDS
// name that is not served, duplicate filter-chain matches in a listener,
// duplicate virtual-host domains, a router filter that is not last, and a
// typed_config whose type is not registered.
func CheckReferences(r *Resources) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	clusters := map[string]bool{}
	for _, c := range r.Clusters {
		if clusters[c.Name] {
			bad("cluster %q defined twice", c.Name)
		}
		clusters[c.Name] = true
	}
	endpoints := map[string]bool{}
	for _, e := range r.Endpoints {
		endpoints[e.ClusterName] = true
		if !clusters[e.ClusterName] {
			bad("endpoints for unknown cluster %q", e.ClusterName)
		}
	}
	for _, c := range r.Clusters {
		if c.GetType().String() == "EDS" && !endpoints[c.GetEdsClusterConfig().GetServiceName()] {
			bad("EDS cluster %q has no ClusterLoadAssignment", c.Name)
		}
	}
	routes := map[string]bool{}
	for _, rc := range r.Routes {
		if routes[rc.Name] {
			bad("route configuration %q defined twice", rc.Name)
		}
		routes[rc.Name] = true
	}
	secrets := map[string]bool{}
	for _, s := range r.Secrets {
		secrets[s] = true
	}
	checkRouteConfig := func(rc *routev3.RouteConfiguration) {
		domains := map[string]string{}
		for _, vh := range rc.VirtualHosts {
			for _, d := range vh.Domains {
				if prev, dup := domains[strings.ToLower(d)]; dup {
					bad("route %q: domain %q in virtual hosts %q and %q", rc.Name, d, prev, vh.Name)
				}
				domains[strings.ToLower(d)] = vh.Name
			}
			for _, rt := range vh.Routes {
				a := rt.GetRoute()
				if a == nil {
					continue
				}
				if c := a.GetCluster(); c != "" && !clusters[c] {
					bad("route %q virtual host %q route %q: unknown cluster %q", rc.Name, vh.Name, rt.Name, c)
				}
				for _, wc := range a.GetWeightedClusters().GetClusters() {
					if !clusters[wc.Name] {
						bad("route %q virtual host %q route %q: unknown weighted cluster %q", rc.Name, vh.Name, rt.Name, wc.Name)
					}
				}
				for _, mp := range a.RequestMirrorPolicies {
					if !clusters[mp.Cluster] {
						bad("route %q route %q: unknown mirror cluster %q", rc.Name, rt.Name, mp.Cluster)
					}
				}
			}
		}
	}
	for _, rc := range r.Routes {
		checkRouteConfig(rc)
	}
	for _, l := range r.Listeners {
		if api := l.GetApiListener().GetApiListener(); api != nil {
			var h hcmv3.HttpConnectionManager
			if err := api.UnmarshalTo(&h); err != nil {
				bad("listener %q: api_listener is not an http_connection_manager: %v", l.Name, err)
				continue
			}
			if rds := h.GetRds(); rds != nil && !routes[rds.RouteConfigName] {
				bad("listener %q: RDS name %q has no route configuration", l.Name, rds.RouteConfigName)
			}
			if hf := h.HttpFilters; len(hf) == 0 || hf[len(hf)-1].Name != "envoy.filters.http.router" {
				bad("listener %q: the router is not the last HTTP filter", l.Name)
			}
			continue
		}
		if len(l.FilterChains) == 0 && l.DefaultFilterChain == nil {
			bad("listener %q has no filter chain", l.Name)
		}
		seen := map[string]bool{}
		chains := append([]*listenerv3.FilterChain{}, l.FilterChains...)
		for _, fc := range chains {
			b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(fc.FilterChainMatch)
			key := string(b)
			if seen[key] {
				bad("listener %q: chain %q repeats the match of another chain", l.Name, fc.Name)
			}
			seen[key] = true
		}
		if l.DefaultFilterChain != nil {
			chains = append(chains, l.DefaultFilterChain)
		}
		for _, fc := range chains {
			for i, f := range fc.Filters {
				a := f.GetTypedConfig()
				if a == nil {
					bad("listener %q chain %q filter %q: no typed_config", l.Name, fc.Name, f.Name)
					continue
				}
				msg, err := a.UnmarshalNew()
				if err != nil {
					bad("listener %q chain %q filter %q: %v", l.Name, fc.Name, f.Name, err)
					continue
				}
				switch cfg := msg.(type) {
				case *hcmv3.HttpConnectionManager:
					if i != len(fc.Filters)-1 {
						bad("listener %q chain %q: http_connection_manager is not the last network filter", l.Name, fc.Name)
					}
					hf := cfg.HttpFilters
					if len(hf) == 0 || hf[len(hf)-1].Name != "envoy.filters.http.router" {
						bad("listener %q chain %q: the router is not the last HTTP filter", l.Name, fc.Name)
					}
					if rds := cfg.GetRds(); rds != nil && !routes[rds.RouteConfigName] {
						bad("listener %q chain %q: RDS name %q has no route configuration", l.Name, fc.Name, rds.RouteConfigName)
					}
					if rc := cfg.GetRouteConfig(); rc != nil {
						checkRouteConfig(rc)
					}
				case *tcpproxyv3.TcpProxy:
					if i != len(fc.Filters)-1 {
						bad("listener %q chain %q: tcp_proxy is not the last network filter", l.Name, fc.Name)
					}
					if c := cfg.GetCluster(); !clusters[c] && cfg.GetOnDemand() == nil {
						bad("listener %q chain %q: tcp_proxy to unknown cluster %q", l.Name, fc.Name, c)
					}
				}
			}
		}
	}
	// Every typed_config type registered; every SDS name served.
	for _, l := range r.Listeners {
		walkAll(l.ProtoReflect(), func(m protoreflect.Message) {
			switch v := m.Interface().(type) {
			case *anypb.Any:
				if _, err := protoregistry.GlobalTypes.FindMessageByURL(v.TypeUrl); err != nil {
					bad("listener %q: typed_config type %q is not registered", l.Name, v.TypeUrl)
				}
			case *tlsv3.SdsSecretConfig:
				if !secrets[v.Name] {
					bad("listener %q: SDS secret %q is referenced but not served", l.Name, v.Name)
				}
			}
		})
	}
	for _, c := range r.Clusters {
		walkAll(c.ProtoReflect(), func(m protoreflect.Message) {
			switch v := m.Interface().(type) {
			case *anypb.Any:
				if _, err := protoregistry.GlobalTypes.FindMessageByURL(v.TypeUrl); err != nil {
					bad("cluster %q: typed_config type %q is not registered", c.Name, v.TypeUrl)
				}
			case *tlsv3.SdsSecretConfig:
				if !secrets[v.Name] {
					bad("cluster %q: SDS secret %q is referenced but not served", c.Name, v.Name)
				}
			}
		})
	}
	return errors.Join(errs...)
}

// walkAll calls f for m and every message inside it, unpacking Anys.
func walkAll(m protoreflect.Message, f func(protoreflect.Message)) {
	f(m)
	if a, ok := m.Interface().(*anypb.Any); ok {
		if inner, err := a.UnmarshalNew(); err == nil {
			walkAll(inner.ProtoReflect(), f)
		}
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				walkAll(v.List().Get(i).Message(), f)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool { walkAll(mv.Message(), f); return true })
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walkAll(v.Message(), f)
		}
		return true
	})
}
