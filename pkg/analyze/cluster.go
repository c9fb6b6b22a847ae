package analyze

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev1 "k8s.io/api/core/v1"

	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
	"github.com/trellis-mesh/trellis/pkg/translate/simulate"
)

// ExternalAddress stands in for what an ExternalService host resolves to.
const ExternalAddress = "192.0.2.1"

// Workload finds the workload [KIND/]NAME in namespace (a Deployment, any
// other workload kind, or a Pod of the manifests).
func (c *Cluster) Workload(namespace, ref string) (*model.Workload, error) {
	kind, name, ok := strings.Cut(ref, "/")
	if !ok {
		kind, name = "", ref
	}
	var found []*model.Workload
	for _, w := range c.Mesh.Workloads {
		o := c.owners[w.Namespace+"/"+w.Name]
		if w.Namespace != namespace || o.Name != name {
			continue
		}
		if kind == "" || strings.EqualFold(kind, o.Kind) || strings.EqualFold(kind, o.Kind+"s") || (strings.EqualFold(kind, "deploy") && o.Kind == "Deployment") {
			found = append(found, w)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		if c.live {
			return nil, fmt.Errorf("no pod %q in namespace %s (name a pod; -n for its namespace)", ref, namespace)
		}
		return nil, fmt.Errorf("no workload %q in namespace %s in the manifests (write [KIND/]NAME, e.g. deployment/frontend, and -n for its namespace)", ref, namespace)
	}
	var names []string
	for _, w := range found {
		names = append(names, c.Owner(w))
	}
	return nil, fmt.Errorf("%q names %s: say which with KIND/NAME", ref, strings.Join(names, " and "))
}

// Live says the cluster was read from a live cluster (Options.Live).
func (c *Cluster) Live() bool { return c.live }

// Owner names the workload a model workload stands for.
func (c *Cluster) Owner(w *model.Workload) string {
	if o, ok := c.owners[w.Namespace+"/"+w.Name]; ok {
		return o.String()
	}
	return "Pod/" + w.Namespace + "/" + w.Name
}

// EndpointOwner is " (<workload>)" for an endpoint "ip:port" of a stand-in
// pod, "" otherwise.
func (c *Cluster) EndpointOwner(endpoint string) string {
	ap, err := netip.ParseAddrPort(endpoint)
	if err != nil {
		return ""
	}
	if w := c.Mesh.WorkloadByIP(ap.Addr().String()); w != nil {
		return " (" + c.Owner(w) + ")"
	}
	return ""
}

// Resolve turns what an application dials into the address it connects
// to, as cluster DNS would, and says what the address is.
func (c *Cluster) Resolve(clientNamespace, host string) (ip, what string) {
	if a, err := netip.ParseAddr(host); err == nil {
		if w := c.Mesh.WorkloadByIP(a.String()); w != nil {
			return a.String(), "pod IP of " + c.Owner(w)
		}
		for _, s := range c.services {
			for _, cip := range s.Spec.ClusterIPs {
				if cip == a.String() {
					return cip, fmt.Sprintf("cluster IP of Service %s/%s", s.Namespace, s.Name)
				}
			}
		}
		return a.String(), "an address no Service or pod of the manifests has"
	}
	name, ns := host, clientNamespace
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	h = strings.TrimSuffix(h, ".cluster.local")
	h = strings.TrimSuffix(h, ".svc")
	if n, rest, ok := strings.Cut(h, "."); ok && !strings.Contains(rest, ".") {
		name, ns = n, rest
	} else if !ok {
		name = h
	}
	if s, ok := c.services[ns+"/"+name]; ok && s.Spec.Type != corev1.ServiceTypeExternalName {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			if svc := c.Mesh.Service(ns, name); svc != nil {
				for _, eps := range svc.Endpoints {
					for _, e := range eps {
						return e.IP, fmt.Sprintf("a pod of headless Service %s/%s", ns, name)
					}
				}
			}
			return "", ""
		}
		if c.live {
			return s.Spec.ClusterIP, fmt.Sprintf("cluster IP of Service %s/%s", ns, name)
		}
		return s.Spec.ClusterIP, fmt.Sprintf("cluster IP (stand-in) of Service %s/%s", ns, name)
	}
	for _, es := range c.external {
		for _, eh := range es.Spec.Hosts {
			if strings.EqualFold(eh, host) {
				return ExternalAddress, fmt.Sprintf("ExternalService %s/%s host, resolved by DNS outside the mesh (address stand-in)", es.Namespace, es.Name)
			}
		}
	}
	return "", ""
}

// Simulator returns a simulator over every meshed workload's sidecar
// configuration, resolving on-demand clusters from the model, and the
// proxies by namespace/pod.
func (c *Cluster) Simulator() (*simulate.Simulator, map[string]*simulate.Proxy) {
	proxies := map[string]*simulate.Proxy{}
	var all []*simulate.Proxy
	for _, w := range c.Mesh.Workloads {
		if w.Mode != model.ProxySidecar || len(w.IPs) == 0 {
			continue
		}
		res, _ := translate.Sidecar(c.Mesh, w)
		p := &simulate.Proxy{Resources: res, ID: c.Mesh.SPIFFEID(w.Namespace, w.ServiceAccount), IP: w.IPs[0]}
		proxies[w.Namespace+"/"+w.Name] = p
		all = append(all, p)
	}
	s := simulate.New(1, all...)
	s.OnDemand = func(name string) (*clusterv3.Cluster, bool) { return translate.PodIPCluster(c.Mesh, name) }
	return s, proxies
}

// RouteKind is the kind (HTTPRoute or GRPCRoute) of the route namespace/name
// attached to some Service, or "route".
func (c *Cluster) RouteKind(namespace, name string) string {
	for _, svc := range c.Mesh.Services {
		rs := append([]*model.Route{}, svc.ProducerRoutes...)
		for _, cr := range svc.ConsumerRoutes {
			rs = append(rs, cr...)
		}
		for _, r := range rs {
			if r.Namespace == namespace && r.Name == name {
				return r.Kind
			}
		}
	}
	return "route"
}

// ServiceAt is the Service with the cluster IP, or nil.
func (c *Cluster) ServiceAt(ip string) *model.Service {
	for _, svc := range c.Mesh.Services {
		if slices.Contains(svc.ClusterIPs, ip) {
			return svc
		}
	}
	return nil
}
