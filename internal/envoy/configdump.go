package envoy

import (
	"context"
	"encoding/json"
	"fmt"
)

// Accepted is what Envoy holds, read from its /config_dump: for each xDS
// type the names of the dynamic resources and their state. A listener or
// cluster still warming waits for something (RDS, EDS, a secret); one in
// error was rejected.
type Accepted struct {
	Listeners map[string]State
	Routes    map[string]State
	Clusters  map[string]State
	Endpoints map[string]State
	Secrets   map[string]State
}

// State of one resource in Envoy.
type State struct {
	Phase string // active, warming or error
	// Error is Envoy's rejection message (Phase error).
	Error string
}

// Accepted reads /config_dump?include_eds.
func (p *Proxy) Accepted(ctx context.Context) (*Accepted, error) {
	b, err := p.Get(ctx, "/config_dump?include_eds")
	if err != nil {
		return nil, err
	}
	return ParseConfigDump(b)
}

type dumpError struct {
	Details string `json:"details"`
}

// ParseConfigDump summarizes an admin config dump (JSON).
func ParseConfigDump(b []byte) (*Accepted, error) {
	var dump struct {
		Configs []json.RawMessage `json:"configs"`
	}
	if err := json.Unmarshal(b, &dump); err != nil {
		return nil, fmt.Errorf("config_dump: %w", err)
	}
	a := &Accepted{Listeners: map[string]State{}, Routes: map[string]State{}, Clusters: map[string]State{}, Endpoints: map[string]State{}, Secrets: map[string]State{}}
	for _, raw := range dump.Configs {
		var c struct {
			Type string `json:"@type"`
			// ListenersConfigDump
			DynamicListeners []struct {
				Name         string          `json:"name"`
				ActiveState  json.RawMessage `json:"active_state"`
				WarmingState json.RawMessage `json:"warming_state"`
				ErrorState   *dumpError      `json:"error_state"`
			} `json:"dynamic_listeners"`
			// ClustersConfigDump
			DynamicActiveClusters []struct {
				Cluster struct {
					Name string `json:"name"`
				} `json:"cluster"`
				ErrorState *dumpError `json:"error_state"`
			} `json:"dynamic_active_clusters"`
			DynamicWarmingClusters []struct {
				Cluster struct {
					Name string `json:"name"`
				} `json:"cluster"`
			} `json:"dynamic_warming_clusters"`
			// RoutesConfigDump
			DynamicRouteConfigs []struct {
				RouteConfig struct {
					Name string `json:"name"`
				} `json:"route_config"`
				ErrorState *dumpError `json:"error_state"`
			} `json:"dynamic_route_configs"`
			// EndpointsConfigDump
			DynamicEndpointConfigs []struct {
				EndpointConfig struct {
					ClusterName string `json:"cluster_name"`
				} `json:"endpoint_config"`
				ErrorState *dumpError `json:"error_state"`
			} `json:"dynamic_endpoint_configs"`
			// SecretsConfigDump
			DynamicActiveSecrets []struct {
				Name       string     `json:"name"`
				ErrorState *dumpError `json:"error_state"`
			} `json:"dynamic_active_secrets"`
			DynamicWarmingSecrets []struct {
				Name string `json:"name"`
			} `json:"dynamic_warming_secrets"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("config_dump entry: %w", err)
		}
		for _, l := range c.DynamicListeners {
			switch {
			case l.ErrorState != nil:
				a.Listeners[l.Name] = State{Phase: "error", Error: l.ErrorState.Details}
			case len(l.WarmingState) > 0:
				a.Listeners[l.Name] = State{Phase: "warming"}
			case len(l.ActiveState) > 0:
				a.Listeners[l.Name] = State{Phase: "active"}
			}
		}
		for _, x := range c.DynamicActiveClusters {
			a.Clusters[x.Cluster.Name] = state(x.ErrorState)
		}
		for _, x := range c.DynamicWarmingClusters {
			a.Clusters[x.Cluster.Name] = State{Phase: "warming"}
		}
		for _, x := range c.DynamicRouteConfigs {
			a.Routes[x.RouteConfig.Name] = state(x.ErrorState)
		}
		for _, x := range c.DynamicEndpointConfigs {
			a.Endpoints[x.EndpointConfig.ClusterName] = state(x.ErrorState)
		}
		for _, x := range c.DynamicActiveSecrets {
			a.Secrets[x.Name] = state(x.ErrorState)
		}
		for _, x := range c.DynamicWarmingSecrets {
			a.Secrets[x.Name] = State{Phase: "warming"}
		}
	}
	return a, nil
}

func state(e *dumpError) State {
	if e != nil {
		return State{Phase: "error", Error: e.Details}
	}
	return State{Phase: "active"}
}
