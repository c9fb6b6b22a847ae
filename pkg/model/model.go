package model

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// Ref names the object a problem is about.
type Ref struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
}

func (r Ref) String() string {
	if r.Namespace == "" {
		return r.Kind + "/" + r.Name
	}
	return r.Kind + "/" + r.Namespace + "/" + r.Name
}

// Problem is something wrong with the user's input. The controller turns it
// into a status condition on Object; the rest of the mesh is unaffected.
type Problem struct {
	Object Ref `json:"object"`
	// Field is the path of the offending field, e.g. spec.rules[0].matches[1].path.
	Field string `json:"field,omitempty"`
	// Reason is a CamelCase condition reason (Gateway API's where one fits).
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// Condition is the condition type the problem sets to False: Accepted or ResolvedRefs.
	Condition string `json:"condition"`
}

func (p Problem) String() string {
	if p.Field == "" {
		return fmt.Sprintf("%s: %s", p.Object, p.Message)
	}
	return fmt.Sprintf("%s: %s: %s", p.Object, p.Field, p.Message)
}

// Protocol is the application protocol of a port.
type Protocol string

const (
	ProtocolHTTP  Protocol = "http"
	ProtocolHTTP2 Protocol = "http2"
	ProtocolGRPC  Protocol = "grpc"
	ProtocolTCP   Protocol = "tcp"
	ProtocolTLS   Protocol = "tls"
)

// IsHTTP says whether the port carries HTTP (any version).
func (p Protocol) IsHTTP() bool { return p == ProtocolHTTP || p == ProtocolHTTP2 || p == ProtocolGRPC }

// IsHTTP2 says whether the port needs HTTP/2 upstream.
func (p Protocol) IsHTTP2() bool { return p == ProtocolHTTP2 || p == ProtocolGRPC }

// ProtocolFor derives a port's protocol the way Istio does: appProtocol
// first (including the kubernetes.io/h2c and k8s.io/ variants), then the
// port name's prefix before "-", else TCP.
func ProtocolFor(name string, appProtocol *string) Protocol {
	if appProtocol != nil {
		switch strings.ToLower(*appProtocol) {
		case "http", "kubernetes.io/http":
			return ProtocolHTTP
		case "http2", "h2c", "kubernetes.io/h2c":
			return ProtocolHTTP2
		case "grpc":
			return ProtocolGRPC
		case "tls", "https":
			return ProtocolTLS
		case "tcp":
			return ProtocolTCP
		}
	}
	prefix := strings.ToLower(name)
	if i := strings.IndexByte(prefix, '-'); i >= 0 {
		prefix = prefix[:i]
	}
	switch prefix {
	case "http":
		return ProtocolHTTP
	case "http2", "h2c":
		return ProtocolHTTP2
	case "grpc":
		return ProtocolGRPC
	case "tls", "https":
		return ProtocolTLS
	}
	return ProtocolTCP
}

// ProxyMode is how a workload takes part in the mesh.
type ProxyMode string

const (
	// ProxyNone: the workload has no proxy (not meshed).
	ProxyNone ProxyMode = ""
	// ProxySidecar: an injected Envoy sidecar.
	ProxySidecar ProxyMode = "envoy"
	// ProxyGRPC: a proxyless gRPC application with gRPC's xDS client.
	ProxyGRPC ProxyMode = "grpc"
)

// Mesh is the whole model, built by Build.
type Mesh struct {
	// Config is the MeshConfig's spec with its defaults, for the control
	// plane's own parts (issuer, certificates, injection).
	Config meshv1alpha1.MeshConfigSpec `json:"config"`
	// Settings are what the data-plane configuration is built from.
	Settings Settings `json:"settings"`
	// Services sorted by namespace and name.
	Services []*Service `json:"services,omitempty"`
	// Workloads sorted by namespace and name.
	Workloads []*Workload `json:"workloads,omitempty"`
	// External services sorted by namespace and name.
	External []*ExternalService `json:"external,omitempty"`
	// PodCIDRs are the pod networks, sorted: a sidecar's call to an IP in
	// them that is no Service's resolves its cluster on demand.
	PodCIDRs []netip.Prefix `json:"podCIDRs,omitempty"`

	servicesByName map[string]*Service
	workloadsByKey map[string]*Workload
	workloadsByIP  map[string]*Workload
	grants         []*gwv1.ReferenceGrant
}

// Service returns the Service namespace/name, or nil.
func (m *Mesh) Service(namespace, name string) *Service {
	return m.servicesByName[namespace+"/"+name]
}

// Workload returns the workload (pod) namespace/name, or nil.
func (m *Mesh) Workload(namespace, name string) *Workload {
	return m.workloadsByKey[namespace+"/"+name]
}

// WorkloadByIP returns the workload (pod) with the IP, or nil. When two
// pods report one IP (a deleted pod whose object outlived its sandbox, so
// its address went to a new pod) the one not being deleted wins, then the
// newer, then the later by namespace and name.
func (m *Mesh) WorkloadByIP(ip string) *Workload {
	return m.workloadsByIP[ip]
}

// SPIFFEID is the identity of a ServiceAccount in the mesh's trust domain.
func (m *Mesh) SPIFFEID(namespace, serviceAccount string) string {
	return SPIFFEID(m.Config.TrustDomain, namespace, serviceAccount)
}

// SPIFFEID is spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
func SPIFFEID(trustDomain, namespace, serviceAccount string) string {
	return "spiffe://" + trustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// Service is a Kubernetes Service in the mesh.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// ClusterIPs are empty for a headless Service.
	ClusterIPs []string      `json:"clusterIPs,omitempty"`
	Ports      []ServicePort `json:"ports,omitempty"`
	// Endpoints per service port number.
	Endpoints map[int32][]Endpoint `json:"endpoints,omitempty"`
	// ServiceAccounts of the pods behind the Service, sorted; the client
	// verifies the server certificate against their SPIFFE IDs.
	ServiceAccounts []string `json:"serviceAccounts,omitempty"`

	// Policy is the BackendPolicy that applies, if any.
	Policy *TrafficPolicy `json:"policy,omitempty"`
	// AccessPolicies that target the Service, sorted by namespace and name.
	AccessPolicies []*AccessPolicy `json:"accessPolicies,omitempty"`
	// ProducerRoutes are the routes in the Service's namespace; they apply
	// to every client without a consumer route.
	ProducerRoutes []*Route `json:"producerRoutes,omitempty"`
	// ConsumerRoutes by the client namespace they apply to (GEP-1686).
	ConsumerRoutes map[string][]*Route `json:"consumerRoutes,omitempty"`
}

// Headless says whether the Service has no cluster IP.
func (s *Service) Headless() bool { return len(s.ClusterIPs) == 0 }

// Hostname is the Service's fully qualified name.
func (s *Service) Hostname() string { return s.Name + "." + s.Namespace + ".svc.cluster.local" }

// Port returns the port with the given number, or nil.
func (s *Service) Port(number int32) *ServicePort {
	for i := range s.Ports {
		if s.Ports[i].Port == number {
			return &s.Ports[i]
		}
	}
	return nil
}

// RoutesFor returns the routes that apply to a client in namespace ns:
// consumer routes of that namespace if any, else the producer routes.
func (s *Service) RoutesFor(ns string) []*Route {
	if r := s.ConsumerRoutes[ns]; len(r) > 0 {
		return r
	}
	return s.ProducerRoutes
}

// ServicePort is one port of a Service.
type ServicePort struct {
	Name       string             `json:"name"`
	Port       int32              `json:"port"`
	TargetPort intstr.IntOrString `json:"targetPort"`
	Protocol   Protocol           `json:"protocol"`
}

// Endpoint is one address behind a Service port.
type Endpoint struct {
	IP          string `json:"ip"`
	Port        int32  `json:"port"`
	Ready       bool   `json:"ready,omitempty"`
	Serving     bool   `json:"serving,omitempty"`
	Terminating bool   `json:"terminating,omitempty"`
	Zone        string `json:"zone,omitempty"`
	// Pod backing the endpoint ("" when the slice names none).
	Pod            string `json:"pod,omitempty"`
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// Mesh is the proxy mode of the backing pod: whether it speaks mTLS.
	Mesh ProxyMode `json:"mesh,omitempty"`
}

// Workload is a pod in the mesh.
type Workload struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	ServiceAccount string            `json:"serviceAccount"`
	IPs            []string          `json:"ips,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Mode           ProxyMode         `json:"mode,omitempty"`
	// ContainerPorts by name, for Services with named target ports.
	ContainerPorts map[string]int32 `json:"containerPorts,omitempty"`
	// ExcludedInboundPorts bypass the pod's sidecar (annotation
	// trellis.dev/exclude-inbound-ports): clients reach them in plaintext.
	ExcludedInboundPorts []int32 `json:"excludedInboundPorts,omitempty"`
	// Zone of the pod, from the EndpointSlices that list it ("" if none do).
	Zone string `json:"zone,omitempty"`
	// Probes the sidecar answers on the kubelet's behalf, by path on the
	// stats port (see AnnotationProbes).
	Probes map[string]AppProbe `json:"probes,omitempty"`
	// Terminating: the pod is being deleted (it may still be draining).
	Terminating bool `json:"terminating,omitempty"`

	created time.Time // the pod's creationTimestamp, to settle IP reuse
}
