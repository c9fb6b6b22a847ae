package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// Annotations and labels the model reads.
const (
	// AnnotationProxy selects the proxy mode of a pod: "envoy" (set by the
	// injector) or "grpc" (set by the user for proxyless gRPC).
	AnnotationProxy = "trellis.dev/proxy"
	// AnnotationExcludeInboundPorts lists ports trellis-init does not capture.
	AnnotationExcludeInboundPorts = "trellis.dev/exclude-inbound-ports"
)

// Input is the cluster state the model is built from: plain Kubernetes
// objects, as the controller's informers hold them.
type Input struct {
	MeshConfig       *meshv1alpha1.MeshConfig
	Services         []*corev1.Service
	EndpointSlices   []*discoveryv1.EndpointSlice
	Pods             []*corev1.Pod
	AccessPolicies   []*meshv1alpha1.AccessPolicy
	BackendPolicies  []*meshv1alpha1.BackendPolicy
	ExternalServices []*meshv1alpha1.ExternalService
	HTTPRoutes       []*gwv1.HTTPRoute
	GRPCRoutes       []*gwv1.GRPCRoute
	ReferenceGrants  []*gwv1.ReferenceGrant
	// Namespaces and ServiceAccounts ("namespace/name") that exist, for
	// checking AccessPolicy sources; IdentitiesKnown says they were listed
	// (without it the sources are not checked).
	Namespaces      []string
	ServiceAccounts []string
	IdentitiesKnown bool
	// ServingTrustDomain is the trust domain the running mesh's
	// certificates and SAN checks use (the controller's record); empty
	// before there is one. A MeshConfig naming another one is refused
	// with a problem and this one stays in force: a change at once would
	// fail every mTLS connection.
	ServingTrustDomain string
	// PodCIDRs are the ranges pod IPs come from (the Nodes' spec.podCIDRs,
	// or the controller's --pod-cidrs): sidecars resolve calls to a pod IP
	// in them on demand (see Mesh.PodCIDRs).
	PodCIDRs []string
}

// Defaults returns spec with every unset field given the CRD's default, so
// the translator never sees a zero value the apiserver would have defaulted.
func Defaults(spec meshv1alpha1.MeshConfigSpec) meshv1alpha1.MeshConfigSpec {
	if spec.MTLS.Mode == "" {
		spec.MTLS.Mode = meshv1alpha1.MTLSStrict
	}
	if spec.TrustDomain == "" {
		spec.TrustDomain = "cluster.local"
	}
	if spec.Certificates.Lifetime == "" {
		spec.Certificates.Lifetime = "24h"
	}
	if spec.Certificates.RotationPercent == 0 {
		spec.Certificates.RotationPercent = 50
	}
	if spec.Issuer.Type == "" {
		spec.Issuer.Type = meshv1alpha1.IssuerBuiltIn
	}
	if cm := spec.Issuer.CertManager; cm != nil && (cm.IssuerRef.Kind == "" || cm.IssuerRef.Group == "") {
		c := *cm
		c.IssuerRef.Kind = cmp.Or(c.IssuerRef.Kind, "Issuer")
		c.IssuerRef.Group = cmp.Or(c.IssuerRef.Group, "cert-manager.io")
		spec.Issuer.CertManager = &c
	}
	if spec.Sidecar.Image == "" {
		spec.Sidecar.Image = "envoyproxy/envoy:v1.40.0"
	}
	if spec.Sidecar.LogLevel == "" {
		spec.Sidecar.LogLevel = "warning"
	}
	if spec.OutboundPolicy == "" {
		spec.OutboundPolicy = meshv1alpha1.OutboundAllowAny
	}
	if spec.DefaultAccess == "" {
		spec.DefaultAccess = meshv1alpha1.DefaultAccessAllow
	}
	if spec.AccessLog != nil && spec.AccessLog.Encoding == "" {
		a := *spec.AccessLog
		a.Encoding = "Text"
		spec.AccessLog = &a
	}
	if spec.Tracing != nil && spec.Tracing.SamplingPercent == nil {
		t := *spec.Tracing
		t.SamplingPercent = ptr.To(int32(1))
		spec.Tracing = &t
	}
	return spec
}

// Build resolves the input into a Mesh. It never fails: what cannot be
// resolved is left out and reported as a Problem on the object at fault.
// Output is deterministic: every list is sorted.
func Build(in Input) (*Mesh, []Problem) {
	var problems []Problem
	m := &Mesh{
		servicesByName: map[string]*Service{},
		workloadsByKey: map[string]*Workload{},
		workloadsByIP:  map[string]*Workload{},
		grants:         in.ReferenceGrants,
	}
	if in.MeshConfig != nil {
		m.Config = Defaults(in.MeshConfig.Spec)
	} else {
		m.Config = Defaults(meshv1alpha1.MeshConfigSpec{})
	}
	if td := in.ServingTrustDomain; td != "" && m.Config.TrustDomain != td {
		problems = append(problems, Problem{
			Object: Ref{Kind: "MeshConfig", Name: meshv1alpha1.MeshConfigName}, Field: "spec.trustDomain",
			Reason: meshv1alpha1.ReasonTrustDomainChangeRefused, Condition: meshv1alpha1.ConditionAccepted,
			Message: fmt.Sprintf("trustDomain %q is not the mesh's trust domain %q, which every workload certificate and SAN check uses: "+
				"a change at once would fail every mTLS connection, so %q stays in force (the rest of this MeshConfig applies). "+
				"Write trustDomain %q; Trellis does not yet migrate a running mesh to another trust domain", m.Config.TrustDomain, td, td, td),
		})
		m.Config.TrustDomain = td
	}
	m.Settings = settings(m.Config)

	for _, p := range in.Pods {
		w := workloadFromPod(p)
		if w == nil {
			continue
		}
		if w.Mode == ProxySidecar {
			var ps []Problem
			w.Probes, ps = parseProbes(p)
			problems = append(problems, ps...)
		}
		m.Workloads = append(m.Workloads, w)
		m.workloadsByKey[w.Namespace+"/"+w.Name] = w
	}
	slices.SortFunc(m.Workloads, func(a, b *Workload) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, w := range m.Workloads {
		for _, ip := range w.IPs {
			if old := m.workloadsByIP[ip]; old == nil || ipClaimWins(w, old) {
				m.workloadsByIP[ip] = w
			}
		}
	}

	for _, s := range in.Services {
		svc := serviceFromObject(s)
		if svc == nil {
			continue
		}
		m.Services = append(m.Services, svc)
		m.servicesByName[svc.Namespace+"/"+svc.Name] = svc
	}
	slices.SortFunc(m.Services, func(a, b *Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	m.PodCIDRs = podCIDRs(in.PodCIDRs)
	m.addEndpoints(in.EndpointSlices)
	problems = append(problems, m.attachBackendPolicies(in.BackendPolicies)...)
	problems = append(problems, m.attachAccessPolicies(in.AccessPolicies)...)
	if in.IdentitiesKnown {
		problems = append(problems, unknownSources(in.AccessPolicies, in.Namespaces, in.ServiceAccounts)...)
	}
	problems = append(problems, m.attachRoutes(in.HTTPRoutes, in.GRPCRoutes)...)
	problems = append(problems, m.addExternal(in.ExternalServices)...)
	return m, problems
}

// podCIDRs parses, masks, sorts and de-duplicates pod CIDRs; malformed
// entries are dropped (the flag is checked at start, Nodes by the apiserver).
func podCIDRs(in []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			continue
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return slices.Compact(out)
}

// ipClaimWins reports whether w, later in the sorted workloads, takes an
// IP that old also reports. A pod being deleted loses to one that is not:
// its sandbox, and with it the address, can be gone before its object is
// (the kubelet deletes the object last, and cannot while the apiserver is
// away). Between two live claims the newer pod wins.
func ipClaimWins(w, old *Workload) bool {
	if w.Terminating != old.Terminating {
		return !w.Terminating
	}
	return !w.created.Before(old.created)
}

func workloadFromPod(p *corev1.Pod) *Workload {
	if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	w := &Workload{
		Namespace:      p.Namespace,
		Name:           p.Name,
		ServiceAccount: cmp.Or(p.Spec.ServiceAccountName, "default"),
		Labels:         p.Labels,
		Mode:           ProxyMode(p.Annotations[AnnotationProxy]),
		ContainerPorts: map[string]int32{},
		Terminating:    p.DeletionTimestamp != nil,
		created:        p.CreationTimestamp.Time,
	}
	if w.Mode != ProxySidecar && w.Mode != ProxyGRPC {
		w.Mode = ProxyNone
	}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			w.IPs = append(w.IPs, a.String())
		}
	}
	if a, err := netip.ParseAddr(p.Status.PodIP); err == nil && len(w.IPs) == 0 {
		w.IPs = []string{a.String()}
	}
	for _, c := range p.Spec.Containers {
		for _, port := range c.Ports {
			if port.Name != "" {
				w.ContainerPorts[port.Name] = port.ContainerPort
			}
		}
	}
	// Ports trellis-init leaves uncaptured take plaintext from clients
	// (the injector ignores values that are not ports; so does this).
	for _, f := range strings.Split(p.Annotations[AnnotationExcludeInboundPorts], ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 && n < 65536 {
			w.ExcludedInboundPorts = append(w.ExcludedInboundPorts, int32(n))
		}
	}
	return w
}

func serviceFromObject(s *corev1.Service) *Service {
	// ExternalName Services are DNS aliases: nothing to proxy.
	if s.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	svc := &Service{
		Namespace:      s.Namespace,
		Name:           s.Name,
		Endpoints:      map[int32][]Endpoint{},
		ConsumerRoutes: map[string][]*Route{},
	}
	for _, ip := range s.Spec.ClusterIPs {
		if ip != "" && ip != corev1.ClusterIPNone {
			svc.ClusterIPs = append(svc.ClusterIPs, ip)
		}
	}
	if len(svc.ClusterIPs) == 0 && s.Spec.ClusterIP != "" && s.Spec.ClusterIP != corev1.ClusterIPNone {
		svc.ClusterIPs = []string{s.Spec.ClusterIP}
	}
	for _, p := range s.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue // UDP and SCTP are not proxied
		}
		tp := p.TargetPort
		if tp.Type == intstr.Int && tp.IntVal == 0 || tp.Type == intstr.String && tp.StrVal == "" {
			tp = intstr.FromInt32(p.Port)
		}
		svc.Ports = append(svc.Ports, ServicePort{
			Name: p.Name, Port: p.Port, TargetPort: tp, Protocol: ProtocolFor(p.Name, p.AppProtocol),
		})
	}
	slices.SortFunc(svc.Ports, func(a, b ServicePort) int { return cmp.Compare(a.Port, b.Port) })
	return svc
}

func (m *Mesh) addEndpoints(slices_ []*discoveryv1.EndpointSlice) {
	for _, es := range slices_ {
		if es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		svc := m.Service(es.Namespace, es.Labels[discoveryv1.LabelServiceName])
		if svc == nil {
			continue
		}
		for _, sp := range svc.Ports {
			var port int32
			found := false
			for _, p := range es.Ports {
				if p.Port != nil && ptr.Deref(p.Name, "") == sp.Name {
					port, found = *p.Port, true
					break
				}
			}
			if !found {
				continue
			}
			for _, e := range es.Endpoints {
				ready := e.Conditions.Ready == nil || *e.Conditions.Ready
				serving := e.Conditions.Serving == nil && ready || e.Conditions.Serving != nil && *e.Conditions.Serving
				terminating := e.Conditions.Terminating != nil && *e.Conditions.Terminating
				ep := Endpoint{Port: port, Ready: ready, Serving: serving, Terminating: terminating, Zone: ptr.Deref(e.Zone, "")}
				if e.TargetRef != nil && e.TargetRef.Kind == "Pod" {
					ep.Pod = e.TargetRef.Name
					if w := m.Workload(es.Namespace, e.TargetRef.Name); w != nil {
						ep.ServiceAccount = w.ServiceAccount
						ep.Mesh = w.Mode
						if slices.Contains(w.ExcludedInboundPorts, port) {
							ep.Mesh = ProxyNone // its sidecar does not see this port
						}
						if w.Zone == "" {
							w.Zone = ep.Zone
						}
					}
				}
				for _, ip := range e.Addresses {
					a, err := netip.ParseAddr(ip)
					if err != nil || port <= 0 || port > 65535 {
						continue // not an address a proxy can dial
					}
					ep.IP = a.String()
					svc.Endpoints[sp.Port] = append(svc.Endpoints[sp.Port], ep)
				}
			}
		}
	}
	for _, svc := range m.Services {
		sas := map[string]bool{}
		for port, eps := range svc.Endpoints {
			slices.SortFunc(eps, func(a, b Endpoint) int {
				return cmp.Or(cmp.Compare(a.IP, b.IP), cmp.Compare(a.Port, b.Port))
			})
			// The same address can appear in two slices during a rollout.
			svc.Endpoints[port] = slices.CompactFunc(eps, func(a, b Endpoint) bool { return a.IP == b.IP && a.Port == b.Port })
			for _, e := range eps {
				if e.ServiceAccount != "" {
					sas[e.ServiceAccount] = true
				}
			}
		}
		for sa := range sas {
			svc.ServiceAccounts = append(svc.ServiceAccounts, sa)
		}
		slices.Sort(svc.ServiceAccounts)
	}
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

func targetProblem(kind, ns, name string, i int, target string) Problem {
	return Problem{
		Object:    Ref{Kind: kind, Namespace: ns, Name: name},
		Field:     fmt.Sprintf("spec.targetRefs[%d]", i),
		Reason:    meshv1alpha1.ReasonTargetNotFound,
		Condition: meshv1alpha1.ConditionResolvedRefs,
		Message:   fmt.Sprintf("Service %s/%s does not exist", ns, target),
	}
}

func (m *Mesh) attachBackendPolicies(policies []*meshv1alpha1.BackendPolicy) []Problem {
	var problems []Problem
	// Oldest first: on a conflict the oldest policy wins, as in Gateway API.
	sorted := slices.Clone(policies)
	slices.SortFunc(sorted, func(a, b *meshv1alpha1.BackendPolicy) int {
		return cmp.Or(a.CreationTimestamp.Compare(b.CreationTimestamp.Time), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, p := range sorted {
		bp := trafficPolicy(p.Namespace, p.Name, BackendPolicyDefaults(p.Spec))
		for i, t := range p.Spec.TargetRefs {
			svc := m.Service(p.Namespace, t.Name)
			if svc == nil {
				problems = append(problems, targetProblem("BackendPolicy", p.Namespace, p.Name, i, t.Name))
				continue
			}
			if svc.Policy != nil {
				problems = append(problems, Problem{
					Object:    Ref{Kind: "BackendPolicy", Namespace: p.Namespace, Name: p.Name},
					Field:     fmt.Sprintf("spec.targetRefs[%d]", i),
					Reason:    meshv1alpha1.ReasonConflicted,
					Condition: meshv1alpha1.ConditionAccepted,
					Message:   fmt.Sprintf("Service %s already has the older BackendPolicy %s; only one BackendPolicy applies to a Service", t.Name, svc.Policy.Name),
				})
				continue
			}
			svc.Policy = bp
		}
	}
	return problems
}

func (m *Mesh) attachAccessPolicies(policies []*meshv1alpha1.AccessPolicy) []Problem {
	var problems []Problem
	sorted := slices.Clone(policies)
	slices.SortFunc(sorted, func(a, b *meshv1alpha1.AccessPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, p := range sorted {
		ap := accessPolicy(m.Config.TrustDomain, p.Namespace, p.Name, AccessPolicyDefaults(p.Spec))
		for i, t := range p.Spec.TargetRefs {
			svc := m.Service(p.Namespace, t.Name)
			if svc == nil {
				problems = append(problems, targetProblem("AccessPolicy", p.Namespace, p.Name, i, t.Name))
				continue
			}
			if !slices.Contains(svc.AccessPolicies, ap) {
				svc.AccessPolicies = append(svc.AccessPolicies, ap)
			}
		}
	}
	return problems
}

// ReasonRefNotFound: a reference names an object that does not exist.
const ReasonRefNotFound = "RefNotFound"

// unknownSources reports AccessPolicy sources naming a namespace or
// ServiceAccount that does not exist. The rule stays programmed (a policy
// may be created before its callers); it matches no caller until they exist.
func unknownSources(policies []*meshv1alpha1.AccessPolicy, namespaces, serviceAccounts []string) []Problem {
	nss := map[string]bool{}
	for _, n := range namespaces {
		nss[n] = true
	}
	sas := map[string]bool{}
	for _, s := range serviceAccounts {
		sas[s] = true
	}
	var problems []Problem
	for _, p := range policies {
		for i, r := range p.Spec.Rules {
			for j, f := range r.From {
				field := fmt.Sprintf("spec.rules[%d].from[%d]", i, j)
				if f.Namespace != nil && *f.Namespace != "*" && !nss[*f.Namespace] {
					problems = append(problems, Problem{Object: Ref{Kind: "AccessPolicy", Namespace: p.Namespace, Name: p.Name}, Field: field + ".namespace",
						Reason: ReasonRefNotFound, Condition: meshv1alpha1.ConditionResolvedRefs,
						Message: fmt.Sprintf("namespace %q does not exist: this source matches no caller until it does (the rule stays programmed)", *f.Namespace)})
				}
				if sa := f.ServiceAccount; sa != nil {
					ns := cmp.Or(sa.Namespace, p.Namespace)
					// Every namespace gets its "default" ServiceAccount.
					if !sas[ns+"/"+sa.Name] && !(sa.Name == "default" && nss[ns]) {
						problems = append(problems, Problem{Object: Ref{Kind: "AccessPolicy", Namespace: p.Namespace, Name: p.Name}, Field: field + ".serviceAccount",
							Reason: ReasonRefNotFound, Condition: meshv1alpha1.ConditionResolvedRefs,
							Message: fmt.Sprintf("ServiceAccount %s/%s does not exist: this source matches no caller until it does (the rule stays programmed)", ns, sa.Name)})
					}
				}
			}
		}
	}
	return problems
}
