package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"regexp"
	"slices"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/trellis-mesh/trellis/pkg/xds"
)

// dumpTypes are config-dump's --type values: the xDS type, the key of the
// resource in Envoy's own config dump, and a fresh message of its type.
type dumpType struct {
	name, typeURL, field string
	new                  func() proto.Message
}

var dumpTypes = []dumpType{
	{"listeners", resource.ListenerType, "listener", func() proto.Message { return &listenerv3.Listener{} }},
	{"routes", resource.RouteType, "route_config", func() proto.Message { return &routev3.RouteConfiguration{} }},
	{"clusters", resource.ClusterType, "cluster", func() proto.Message { return &clusterv3.Cluster{} }},
	{"endpoints", resource.EndpointType, "endpoint_config", func() proto.Message { return &endpointv3.ClusterLoadAssignment{} }},
	{"secrets", resource.SecretType, "secret", nil},
}

func newConfigDump() *cobra.Command {
	d := newDebugFlags()
	var output, fromFile string
	var types []string
	cmd := &cobra.Command{
		Use:   "config-dump POD",
		Short: "Print what the control plane serves a pod's proxy, or diff it with the proxy's own config dump",
		Long: `config-dump prints the configuration the control plane serves the proxy of POD, by type, as
Envoy's own JSON/YAML: listeners, routes, clusters, endpoints (each with the version served) and
secrets — described by name, identity, SANs and validity; no private key ever leaves the
control plane this way.

--from-file takes the proxy's own /config_dump (Envoy admin, e.g.
kubectl exec POD -c trellis-proxy -- curl -s 'localhost:15000/config_dump?include_eds') and
compares it with what is served: resources served but not applied, applied but not served, and
applied with other content (the proxy rejected or has not received the latest; see
trellisctl proxy-status). The exit status is 1 when they differ.`,
		Example: `  trellisctl config-dump -n shop reviews-v1-7d9f8 --type routes
  trellisctl config-dump -n shop reviews-v1-7d9f8 --from-file envoy-dump.json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !slices.Contains([]string{"yaml", "json"}, output) {
				return usageError(cmd, "--output must be yaml or json")
			}
			for _, t := range types {
				if !slices.ContainsFunc(dumpTypes, func(dt dumpType) bool { return dt.name == t }) {
					return usageError(cmd, fmt.Sprintf("--type %q: write listeners, routes, clusters, endpoints or secrets", t))
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), d.timeout)
			defer cancel()
			conn, err := d.connect(ctx, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer conn.Close()
			ns := d.namespace()
			dump, err := configDump(ctx, conn, ns, args[0])
			if err != nil {
				return err
			}
			if fromFile != "" {
				applied, err := readEnvoyDump(fromFile, cmd.InOrStdin())
				if err != nil {
					return err
				}
				differ, err := diffDump(cmd.OutOrStdout(), dump, applied, types)
				if err != nil {
					return err
				}
				if differ {
					return exitError{1}
				}
				return nil
			}
			out, err := servedByType(dump, types)
			if err != nil {
				return err
			}
			return printStructured(cmd.OutOrStdout(), out, output)
		},
	}
	d.add(cmd.Flags())
	cmd.Flags().StringVarP(&output, "output", "o", "yaml", "yaml or json")
	cmd.Flags().StringSliceVar(&types, "type", nil, "only these: listeners, routes, clusters, endpoints, secrets (repeatable)")
	cmd.Flags().StringVar(&fromFile, "from-file", "", "the proxy's own Envoy /config_dump (JSON; - for stdin) to compare with")
	return cmd
}

// configDump asks the replicas in turn: the proxy is connected to one.
func configDump(ctx context.Context, conn *debugConn, ns, pod string) (*xds.ConfigDump, error) {
	q := url.Values{"namespace": {ns}, "pod": {pod}}
	for _, r := range conn.replicas {
		var dump xds.ConfigDump
		err := conn.get(ctx, r, xds.DebugConfigDumpPath, q, &dump)
		if errors.As(err, new(errNotOnReplica)) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return &dump, nil
	}
	return nil, fmt.Errorf("no proxy of pod %s/%s is connected to the control plane (%d replicas asked); trellisctl proxy-status lists those that are", ns, pod, len(conn.replicas))
}

// servedByType is the printed form: {nodeID, class, listeners: [...], ...}.
func servedByType(dump *xds.ConfigDump, only []string) (map[string]any, error) {
	out := map[string]any{"nodeID": dump.NodeID, "class": dump.Class}
	for _, t := range dumpTypes {
		if len(only) > 0 && !slices.Contains(only, t.name) {
			continue
		}
		if t.typeURL == resource.SecretType {
			out[t.name] = dump.Secrets
			continue
		}
		list := []map[string]any{}
		for _, r := range dump.Resources {
			if r.Type == t.typeURL {
				list = append(list, map[string]any{"name": r.Name, "version": r.Version, t.field: r.Resource})
			}
		}
		out[t.name] = list
	}
	return out, nil
}

// envoyDump is what we read of Envoy's /config_dump: dynamic resources by
// type URL and name, as JSON, plus listeners Envoy rejected.
type envoyDump struct {
	resources map[string]map[string]json.RawMessage
	rejected  map[string]string // listener name -> Envoy's error
}

func readEnvoyDump(path string, stdin io.Reader) (*envoyDump, error) {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(stdin)
	} else {
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	var raw struct {
		Configs []map[string]json.RawMessage `json:"configs"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("%s is not an Envoy config dump (JSON with \"configs\"): %w", path, err)
	}
	d := &envoyDump{resources: map[string]map[string]json.RawMessage{}, rejected: map[string]string{}}
	add := func(typeURL string, entries json.RawMessage, inner ...string) error {
		var list []map[string]json.RawMessage
		if len(entries) == 0 {
			return nil
		}
		if err := json.Unmarshal(entries, &list); err != nil {
			return err
		}
		for _, e := range list {
			m := e
			for _, k := range inner[:len(inner)-1] {
				if err := json.Unmarshal(m[k], &m); err != nil || m == nil {
					m = nil
					break
				}
			}
			if m == nil {
				continue
			}
			res := m[inner[len(inner)-1]]
			var named struct {
				Name        string `json:"name"`
				ClusterName string `json:"cluster_name"`
			}
			if err := json.Unmarshal(res, &named); err != nil {
				return err
			}
			if d.resources[typeURL] == nil {
				d.resources[typeURL] = map[string]json.RawMessage{}
			}
			d.resources[typeURL][cmp.Or(named.Name, named.ClusterName)] = res
		}
		return nil
	}
	for _, c := range raw.Configs {
		var typ string
		_ = json.Unmarshal(c["@type"], &typ)
		var err error
		switch typ {
		case "type.googleapis.com/envoy.admin.v3.ClustersConfigDump":
			err = add(resource.ClusterType, c["dynamic_active_clusters"], "cluster")
		case "type.googleapis.com/envoy.admin.v3.ListenersConfigDump":
			err = add(resource.ListenerType, c["dynamic_listeners"], "active_state", "listener")
			var ls []struct {
				Name       string `json:"name"`
				ErrorState *struct {
					Details string `json:"details"`
				} `json:"error_state"`
			}
			if json.Unmarshal(c["dynamic_listeners"], &ls) == nil {
				for _, l := range ls {
					if l.ErrorState != nil {
						d.rejected[l.Name] = l.ErrorState.Details
					}
				}
			}
		case "type.googleapis.com/envoy.admin.v3.RoutesConfigDump":
			err = add(resource.RouteType, c["dynamic_route_configs"], "route_config")
		case "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump":
			err = add(resource.EndpointType, c["dynamic_endpoint_configs"], "endpoint_config")
		case "type.googleapis.com/envoy.admin.v3.SecretsConfigDump":
			err = add(resource.SecretType, c["dynamic_active_secrets"], "secret")
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", path, typ, err)
		}
	}
	return d, nil
}

// diffDump prints how what Envoy applied differs from what is served and
// reports whether it does.
func diffDump(w io.Writer, served *xds.ConfigDump, applied *envoyDump, only []string) (bool, error) {
	differ := false
	for _, t := range dumpTypes {
		if len(only) > 0 && !slices.Contains(only, t.name) {
			continue
		}
		servedNames := map[string]json.RawMessage{}
		if t.typeURL == resource.SecretType {
			for _, s := range served.Secrets {
				servedNames[s.Name] = nil
			}
		} else {
			for _, r := range served.Resources {
				if r.Type == t.typeURL {
					servedNames[r.Name] = r.Resource
				}
			}
		}
		got := applied.resources[t.typeURL]
		same, problems, notes := 0, []string{}, []string{}
		for _, name := range slices.Sorted(maps.Keys(servedNames)) {
			a, ok := got[name]
			switch {
			case !ok && applied.rejected[name] != "":
				problems = append(problems, fmt.Sprintf("✘ %s %s: served, rejected by the proxy: %s", t.field, name, applied.rejected[name]))
			case !ok && t.typeURL == resource.EndpointType && len(got) == 0:
				// Envoy dumps endpoints only with ?include_eds.
			case !ok:
				problems = append(problems, fmt.Sprintf("✘ %s %s: served, not applied (not received yet, or rejected: trellisctl proxy-status)", t.field, name))
			case t.new == nil:
				same++ // secrets: names only
			default:
				compare := sameResource
				if t.typeURL == resource.EndpointType {
					compare = sameEndpoints
				}
				eq, err := compare(t.new, servedNames[name], a)
				if err != nil {
					problems = append(problems, fmt.Sprintf("! %s %s: cannot compare: %v", t.field, name, err))
					continue
				}
				if !eq {
					problems = append(problems, fmt.Sprintf("✘ %s %s: applied content differs from served (the proxy runs an older version; trellisctl proxy-status says whether it rejected the latest)", t.field, name))
					continue
				}
				same++
			}
		}
		for _, name := range slices.Sorted(maps.Keys(got)) {
			if t.typeURL == resource.EndpointType && servedCluster(served, name) {
				// Envoy also dumps the inline endpoints of clusters that
				// are not discovered over EDS (static, DNS).
				continue
			}
			if _, ok := servedNames[name]; !ok {
				if t.typeURL == resource.RouteType && !applied.listenersUse(name) {
					// Envoy keeps the route table of a removed filter chain
					// while the chain drains (and RDS removals do not drop
					// it); no listener routes by it.
					notes = append(notes, fmt.Sprintf("· %s %s: applied, no longer served, used by no listener (left from a removed filter chain; harmless)", t.field, name))
					continue
				}
				problems = append(problems, fmt.Sprintf("✘ %s %s: applied, no longer served (removal not received yet)", t.field, name))
			}
		}
		fmt.Fprintf(w, "%s: %d served, %d applied, %d the same\n", t.name, len(servedNames), applied.count(t.typeURL, served), same)
		for _, p := range append(problems, notes...) {
			fmt.Fprintln(w, "  "+p)
		}
		differ = differ || len(problems) > 0
	}
	if !differ {
		fmt.Fprintln(w, "✔ the proxy runs what the control plane serves")
	}
	return differ, nil
}

// sameResource compares two JSON forms of one resource as protos (field
// order, defaults and name styles do not matter).
func sameResource(newMsg func() proto.Message, served, applied json.RawMessage) (bool, error) {
	a, b := newMsg(), newMsg()
	opts := protojson.UnmarshalOptions{DiscardUnknown: true}
	if err := opts.Unmarshal(served, a); err != nil {
		return false, fmt.Errorf("served: %w", err)
	}
	if err := opts.Unmarshal(applied, b); err != nil {
		return false, fmt.Errorf("applied: %w", err)
	}
	return proto.Equal(a, b), nil
}

// count is how many resources of a type Envoy applied, leaving out the
// inline endpoints of served clusters that are not discovered over EDS.
func (d *envoyDump) count(typeURL string, served *xds.ConfigDump) int {
	n := 0
	for name := range d.resources[typeURL] {
		if typeURL != resource.EndpointType || !servedCluster(served, name) {
			n++
		}
	}
	return n
}

// servedCluster says whether name is a served cluster whose endpoints are
// not served over EDS.
func servedCluster(d *xds.ConfigDump, name string) bool {
	cluster, eds := false, false
	for _, r := range d.Resources {
		if r.Name == name {
			cluster = cluster || r.Type == resource.ClusterType
			eds = eds || r.Type == resource.EndpointType
		}
	}
	return cluster && !eds
}

// sameEndpoints compares load assignments by what Envoy keeps of them:
// Envoy dumps the hosts it built (with health, weight and policy
// defaults filled in), not the message it received, so compare priority,
// zone and address of every endpoint.
func sameEndpoints(newMsg func() proto.Message, served, applied json.RawMessage) (bool, error) {
	a, b := newMsg().(*endpointv3.ClusterLoadAssignment), newMsg().(*endpointv3.ClusterLoadAssignment)
	opts := protojson.UnmarshalOptions{DiscardUnknown: true}
	if err := opts.Unmarshal(served, a); err != nil {
		return false, fmt.Errorf("served: %w", err)
	}
	if err := opts.Unmarshal(applied, b); err != nil {
		return false, fmt.Errorf("applied: %w", err)
	}
	return slices.Equal(hostKeys(a), hostKeys(b)), nil
}

func hostKeys(cla *endpointv3.ClusterLoadAssignment) []string {
	var out []string
	for _, l := range cla.GetEndpoints() {
		for _, e := range l.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			out = append(out, fmt.Sprintf("%d/%s/%s:%d", l.GetPriority(), l.GetLocality().GetZone(), sa.GetAddress(), sa.GetPortValue()))
		}
	}
	slices.Sort(out)
	return out
}

// listenersUse says whether an applied listener routes by the RDS name.
func (d *envoyDump) listenersUse(routeName string) bool {
	quoted, _ := json.Marshal(routeName)
	uses := regexp.MustCompile(`"route_config_name":\s*` + regexp.QuoteMeta(string(quoted)))
	for _, l := range d.resources[resource.ListenerType] {
		if uses.Match(l) {
			return true
		}
	}
	return false
}
