package model

import "reflect"

// EndpointChanges compares two models. When next differs from prev only in
// Services' endpoints it returns next's Services whose endpoints changed
// (sorted as Services are) and true; anything else that differs — a
// Service, workload, route, policy or setting, or a Service's
// ServiceAccounts, which endpoints feed — returns false, and the caller
// recomputes everything. It costs one walk of both models, far less than
// translating them.
func EndpointChanges(prev, next *Mesh) ([]*Service, bool) {
	if prev == nil || next == nil || len(prev.Services) != len(next.Services) {
		return nil, false
	}
	var changed []*Service
	for i, s := range next.Services {
		if !reflect.DeepEqual(prev.Services[i].Endpoints, s.Endpoints) {
			changed = append(changed, s)
		}
	}
	if !reflect.DeepEqual(withoutEndpoints(prev), withoutEndpoints(next)) {
		return nil, false
	}
	return changed, true
}

// withoutEndpoints is a shallow copy of m without the Services' endpoints
// and without the indexes (derived from what is kept).
func withoutEndpoints(m *Mesh) Mesh {
	c := *m
	c.servicesByName, c.workloadsByKey, c.workloadsByIP = nil, nil, nil
	c.Services = make([]*Service, len(m.Services))
	for i, s := range m.Services {
		cp := *s
		cp.Endpoints = nil
		c.Services[i] = &cp
	}
	return c
}
