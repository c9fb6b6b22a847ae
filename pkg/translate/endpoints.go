package translate

import (
	"slices"
	"sync"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// EndpointUpdate recomputes, after a change of endpoints only
// (model.EndpointChanges), the ClusterLoadAssignments that change — and
// nothing else: every other resource of every class is what the full
// translation of the new model would give, byte for byte. One value serves
// every class of a round: a ClusterLoadAssignment is computed once per
// variant (the proxy's zone matters only with locality failover) and the
// same message is returned to every class that holds it. Safe for
// concurrent use.
type EndpointUpdate struct {
	prev, mesh *model.Mesh
	changed    []*model.Service

	mu   sync.Mutex
	memo map[string]*endpointv3.ClusterLoadAssignment
}

// NewEndpointUpdate returns the update from prev to next, which differ only
// in the endpoints of changed, or false when such a change reaches beyond
// the ClusterLoadAssignments: a headless Service's endpoints are filter
// chains of the outbound listener, and whether every endpoint is meshed
// decides a proxyless client's (and a headless cluster's) mTLS.
func NewEndpointUpdate(prev, next *model.Mesh, changed []*model.Service) (*EndpointUpdate, bool) {
	for _, s := range changed {
		old := prev.Service(s.Namespace, s.Name)
		if old == nil || s.Headless() || old.Headless() {
			return nil, false
		}
		for _, p := range s.Ports {
			if allMeshed(old.Endpoints[p.Port]) != allMeshed(s.Endpoints[p.Port]) {
				return nil, false
			}
		}
	}
	return &EndpointUpdate{prev: prev, mesh: next, changed: changed, memo: map[string]*endpointv3.ClusterLoadAssignment{}}, true
}

// KeepsClass reports whether w's ClassKey is the same in both models: it
// is unless a changed Service of w's namespace lists w among its old or new
// endpoints (the ports a pod serves are part of its class).
func (u *EndpointUpdate) KeepsClass(w *model.Workload) bool {
	lists := func(eps map[int32][]model.Endpoint) bool {
		for _, es := range eps {
			for _, e := range es {
				if e.Pod == w.Name || slices.Contains(w.IPs, e.IP) {
					return true
				}
			}
		}
		return false
	}
	for _, s := range u.changed {
		if s.Namespace != w.Namespace {
			continue
		}
		if lists(s.Endpoints) || lists(u.prev.Service(s.Namespace, s.Name).Endpoints) {
			return false
		}
	}
	return true
}

// For returns the changed ClusterLoadAssignments of proxy w's class, among
// those the class holds (holds reports whether it has one by that name: a
// Service the class does not see has none). The messages are shared: do
// not modify them.
func (u *EndpointUpdate) For(w *model.Workload, holds func(name string) bool) []*endpointv3.ClusterLoadAssignment {
	var out []*endpointv3.ClusterLoadAssignment
	t := &translator{mesh: u.mesh, proxy: w}
	for _, svc := range u.changed {
		for i := range svc.Ports {
			port := &svc.Ports[i]
			name := OutboundClusterName(svc.Hostname(), port.Port)
			if !holds(name) {
				continue
			}
			// With locality failover the priorities depend on the proxy's zone.
			key := name + "\x00" + failoverZone(svc, w)
			u.mu.Lock()
			cla, ok := u.memo[key]
			if !ok {
				cla = t.loadAssignment(name, svc, port)
				u.memo[key] = cla
			}
			u.mu.Unlock()
			out = append(out, cla)
		}
	}
	return slices.Clip(out)
}
