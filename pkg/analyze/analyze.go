package analyze

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/inject"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// Severity of a finding.
type Severity string

const (
	// Error: the configuration is refused or does not do what it says
	// (a status condition would be False). Analyze exits non-zero.
	Error Severity = "error"
	// Warning: likely a mistake, or something the manifests alone cannot
	// settle (e.g. a Service whose pods live elsewhere).
	Warning Severity = "warning"
)

// Finding is one thing wrong.
type Finding struct {
	Severity Severity  `json:"severity"`
	Object   model.Ref `json:"object"`
	Field    string    `json:"field,omitempty"`
	// Reason is the status condition reason for problems the controller
	// reports (the same codes), or an analyze code for the other checks.
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// Source is file#document, for findings about a document.
	Source string `json:"source,omitempty"`
}

// Analyze codes of the checks beyond the model's problems.
const (
	ReasonNoPods          = "NoPods"
	ReasonNotInjected     = "NotInjected"
	ReasonPortProtocol    = "NoPortProtocol"
	ReasonUnknownIdentity = "UnknownIdentity"
	ReasonUnmeshedStrict  = "UnmeshedUnderStrict"
	ReasonInjection       = "InjectionWarning"
	ReasonParentGroup     = "ParentRefGroup"
)

// Options tune the stand-ins for the cluster.
type Options struct {
	// AssumeInjection treats namespaces the manifests do not define as
	// labelled trellis.dev/inject=enabled (the usual case for an app's
	// manifests); namespaces they define decide by their label.
	AssumeInjection bool
	// Live: the objects are a cluster's (Live): pods are used as they run
	// (injected or not, with their IPs), Services and EndpointSlices as the
	// cluster made them, and nothing stands in for them.
	Live bool
}

// Live analyses what a cluster holds: in as the controller lists it
// (controller.ListInput), and its Namespaces (for their labels).
func Live(in model.Input, namespaces []*corev1.Namespace) *Cluster {
	return Build(&Objects{Input: in, Namespaces: namespaces, Skipped: map[string]int{}}, Options{Live: true})
}

// Report is the result of Run.
type Report struct {
	Findings []Finding `json:"findings"`
	// Workloads and Services analysed, for the summary.
	Workloads int `json:"workloads"`
	Services  int `json:"services"`
	// Skipped documents of kinds the mesh does not read, by kind.
	Skipped map[string]int `json:"skipped,omitempty"`
}

// Errors counts the error findings.
func (r *Report) Errors() int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == Error {
			n++
		}
	}
	return n
}

// Cluster is what the manifests make: the mesh model over stand-in pods,
// cluster IPs and endpoints, with the findings on the way.
type Cluster struct {
	Mesh     *model.Mesh
	Findings []Finding
	// owners: pod namespace/name → the workload it stands for.
	owners map[string]model.Ref
	// services by namespace/name, with their (stand-in) cluster IPs.
	services map[string]*corev1.Service
	external []*meshv1alpha1.ExternalService
	// live: built from a cluster (Options.Live), nothing stands in.
	live bool
}

// Run analyses the objects.
func Run(o *Objects, opts Options) *Report {
	rep := Build(o, opts).Report()
	rep.Skipped = o.Skipped
	return rep
}

// Report is the cluster's findings, for printing.
func (c *Cluster) Report() *Report {
	return &Report{Findings: c.Findings, Workloads: len(c.Mesh.Workloads), Services: len(c.Mesh.Services)}
}

// Build makes the cluster the objects describe and analyses it.
func Build(o *Objects, opts Options) *Cluster {
	rep := &Cluster{owners: map[string]model.Ref{}, services: map[string]*corev1.Service{}, external: o.ExternalServices, live: opts.Live}
	add := func(f Finding) { rep.Findings = append(rep.Findings, f) }

	var mc meshv1alpha1.MeshConfigSpec
	if o.MeshConfig != nil {
		mc = o.MeshConfig.Spec
	}
	mc = model.Defaults(mc)

	// Pods: the manifests' own, and one per workload template, through the
	// real injector (its warnings are findings).
	nsLabels := map[string]map[string]string{}
	for _, n := range o.Namespaces {
		nsLabels[n.Name] = n.Labels
	}
	injected := func(ns string) bool {
		if l, ok := nsLabels[ns]; ok {
			return l[inject.LabelInject] == "enabled"
		}
		return opts.AssumeInjection
	}
	type podOf struct {
		pod   *corev1.Pod
		owner model.Ref
	}
	var pods []podOf
	for _, p := range o.Pods {
		pods = append(pods, podOf{p.DeepCopy(), model.Ref{Kind: "Pod", Namespace: p.Namespace, Name: p.Name}})
	}
	for _, w := range o.Workloads {
		p := &corev1.Pod{ObjectMeta: *w.Template.ObjectMeta.DeepCopy(), Spec: *w.Template.Spec.DeepCopy()}
		p.Namespace, p.Name = w.Meta.Namespace, strings.ToLower(w.Kind)+"-"+w.Meta.Name
		pods = append(pods, podOf{p, w.Ref()})
	}
	slices.SortFunc(pods, func(a, b podOf) int {
		return cmp.Or(cmp.Compare(a.pod.Namespace, b.pod.Namespace), cmp.Compare(a.pod.Name, b.pod.Name))
	})
	podIP := netip.MustParseAddr("10.244.0.1")
	cfg := inject.Config{Mesh: mc, InitImage: "trellis-init", XDSHost: "trellis-xds.trellis-system.svc", XDSPort: 15012}
	// The kinds the mesh reads as written; pods, Services and endpoints
	// are replaced by their stand-ins below.
	in := o.Input
	in.Pods, in.Services = nil, nil
	for _, po := range pods {
		p := po.pod
		if opts.Live {
			in.Pods = append(in.Pods, p)
			continue
		}
		if injected(p.Namespace) && p.Annotations[inject.AnnotationStatus] != "injected" {
			var warnings []string
			p, warnings = inject.Pod(p, cfg)
			for _, w := range warnings {
				add(Finding{Severity: Warning, Object: po.owner, Reason: ReasonInjection, Message: "injection: " + w})
			}
		}
		if p.Spec.ServiceAccountName == "" {
			p.Spec.ServiceAccountName = "default"
		}
		ip := podIP.String()
		podIP = podIP.Next()
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
		in.Pods = append(in.Pods, p)
		po.pod = p
	}
	podOwner := map[*corev1.Pod]model.Ref{}
	for i, p := range in.Pods {
		podOwner[p] = pods[i].owner
		rep.owners[p.Namespace+"/"+p.Name] = pods[i].owner
	}

	// Services get a cluster IP as the apiserver would give one, and
	// EndpointSlices as the EndpointSlice controller would build them.
	svcIP := netip.MustParseAddr("10.96.0.10")
	in.EndpointSlices = slices.Clone(o.EndpointSlices)
	for _, s := range o.Services {
		s = s.DeepCopy()
		if s.Spec.Type != corev1.ServiceTypeExternalName && s.Spec.ClusterIP == "" {
			ip := svcIP.String()
			svcIP = svcIP.Next()
			s.Spec.ClusterIP, s.Spec.ClusterIPs = ip, []string{ip}
		}
		in.Services = append(in.Services, s)
		rep.services[s.Namespace+"/"+s.Name] = s
		if len(s.Spec.Selector) == 0 || s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		ref := model.Ref{Kind: "Service", Namespace: s.Namespace, Name: s.Name}
		sel := labels.SelectorFromSet(s.Spec.Selector)
		var selected []*corev1.Pod
		for _, p := range in.Pods {
			if p.Namespace == s.Namespace && sel.Matches(labels.Set(p.Labels)) {
				selected = append(selected, p)
			}
		}
		if len(selected) == 0 {
			msg := fmt.Sprintf("no pod or workload in the manifests matches %s; unless its pods are deployed from elsewhere, clients get 503 (no healthy upstream)", sel)
			if opts.Live {
				msg = fmt.Sprintf("no pod matches %s: clients get 503 (no healthy upstream)", sel)
			}
			add(Finding{Severity: Warning, Object: ref, Field: "spec.selector", Reason: ReasonNoPods, Message: msg})
			continue
		}
		var unmeshed []string
		for _, p := range selected {
			if p.Annotations[model.AnnotationProxy] == "" {
				unmeshed = append(unmeshed, podOwner[p].String())
			}
		}
		if len(unmeshed) > 0 {
			add(Finding{Severity: Warning, Object: ref, Reason: ReasonNotInjected,
				Message: fmt.Sprintf("its pods from %s get no sidecar (namespace without trellis.dev/inject=enabled, or pod label trellis.dev/inject=disabled): no mTLS, policies or routes apply on the server side", strings.Join(unmeshed, ", "))})
		}
		if !opts.Live {
			in.EndpointSlices = append(in.EndpointSlices, endpointSlice(s, selected))
		}
	}
	if !opts.Live {
		// The stand-in pods' network, as a Node's spec.podCIDRs would give it.
		in.PodCIDRs = []string{"10.244.0.0/16"}
	}

	mesh, problems := model.Build(in)
	for _, w := range mesh.Workloads {
		if w.Mode == model.ProxyNone {
			continue
		}
		_, tp := translate.ForWorkload(mesh, w)
		problems = append(problems, tp...)
	}
	for _, p := range problems {
		add(Finding{Severity: Error, Object: p.Object, Field: p.Field, Reason: p.Reason, Message: p.Message})
	}
	rep.Mesh = mesh

	for _, r := range o.HTTPRoutes {
		misgrouped(model.Ref{Kind: "HTTPRoute", Namespace: r.Namespace, Name: r.Name}, r.Spec.ParentRefs, add)
	}
	for _, r := range o.GRPCRoutes {
		misgrouped(model.Ref{Kind: "GRPCRoute", Namespace: r.Namespace, Name: r.Name}, r.Spec.ParentRefs, add)
	}
	portProtocols(o.Services, add)
	if !opts.Live {
		// Live, the model checks them against what exists (RefNotFound).
		identities(o, add)
	}
	if mc.MTLS.Mode == meshv1alpha1.MTLSStrict {
		for i, p := range in.Pods {
			// Live, only pods of meshed namespaces: the others (kube-system…)
			// are not meant to be meshed.
			if opts.Live && nsLabels[p.Namespace][inject.LabelInject] != "enabled" {
				continue
			}
			if p.Annotations[model.AnnotationProxy] == "" && !p.Spec.HostNetwork {
				add(Finding{Severity: Warning, Object: pods[i].owner, Reason: ReasonUnmeshedStrict,
					Message: "this workload has no sidecar and mTLS is Strict: its calls to meshed Services are refused (inject it, or use Permissive while migrating)"})
			}
		}
	}

	slices.SortFunc(rep.Findings, func(a, b Finding) int {
		return cmp.Or(cmp.Compare(a.Object.String(), b.Object.String()), cmp.Compare(a.Field, b.Field), cmp.Compare(a.Reason, b.Reason), cmp.Compare(a.Message, b.Message), cmp.Compare(a.Source, b.Source))
	})
	rep.Findings = slices.Compact(rep.Findings)
	return rep
}

func endpointSlice(s *corev1.Service, pods []*corev1.Pod) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name + "-analyze", Labels: map[string]string{discoveryv1.LabelServiceName: s.Name}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, sp := range s.Spec.Ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptr.To(sp.Name), Port: ptr.To(targetPort(sp, pods)), Protocol: ptr.To(cmp.Or(sp.Protocol, corev1.ProtocolTCP)), AppProtocol: sp.AppProtocol})
	}
	for _, p := range pods {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
		})
	}
	return es
}

// targetPort resolves a named target port against the first pod that
// declares it (the EndpointSlice controller does so per pod).
func targetPort(sp corev1.ServicePort, pods []*corev1.Pod) int32 {
	switch {
	case sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal != 0:
		return sp.TargetPort.IntVal
	case sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal != "":
		for _, p := range pods {
			for _, c := range p.Spec.Containers {
				for _, cp := range c.Ports {
					if cp.Name == sp.TargetPort.StrVal {
						return cp.ContainerPort
					}
				}
			}
		}
	}
	return sp.Port
}

// portProtocols warns about Service ports whose protocol falls back to TCP
// because neither appProtocol nor the name says otherwise.
func portProtocols(svcs []*corev1.Service, add func(Finding)) {
	for _, s := range svcs {
		for i, p := range s.Spec.Ports {
			if p.AppProtocol != nil || model.ProtocolFor(p.Name, nil) != model.ProtocolTCP {
				continue
			}
			if n := strings.ToLower(p.Name); n == "tcp" || strings.HasPrefix(n, "tcp-") {
				continue // said so
			}
			add(Finding{Severity: Warning, Object: model.Ref{Kind: "Service", Namespace: s.Namespace, Name: s.Name}, Field: fmt.Sprintf("spec.ports[%d]", i), Reason: ReasonPortProtocol,
				Message: fmt.Sprintf("port %d (name %q) has no appProtocol and its name names no protocol: it is treated as TCP, so HTTPRoutes, retries and L7 policy do not apply; set appProtocol: http (or grpc, http2, tcp) or name it http-…", p.Port, p.Name)})
		}
	}
}

// identities warns about AccessPolicy sources naming a ServiceAccount or
// namespace the manifests would have defined if it existed: a namespace
// with ServiceAccounts in the manifests but not that one, or a namespace
// the manifests do not define while they define others.
func identities(o *Objects, add func(Finding)) {
	sas := map[string]bool{}
	sasIn := map[string]bool{}
	for _, sa := range o.ServiceAccounts {
		sas[sa.Namespace+"/"+sa.Name] = true
		sasIn[sa.Namespace] = true
	}
	for _, w := range o.Workloads {
		sa := cmp.Or(w.Template.Spec.ServiceAccountName, "default")
		sas[w.Meta.Namespace+"/"+sa] = true
	}
	nss := map[string]bool{}
	for _, n := range o.Namespaces {
		nss[n.Name] = true
	}
	for _, ap := range o.AccessPolicies {
		ref := model.Ref{Kind: "AccessPolicy", Namespace: ap.Namespace, Name: ap.Name}
		for i, r := range ap.Spec.Rules {
			for j, f := range r.From {
				field := fmt.Sprintf("spec.rules[%d].from[%d]", i, j)
				if f.ServiceAccount != nil {
					ns := cmp.Or(f.ServiceAccount.Namespace, ap.Namespace)
					if sasIn[ns] && !sas[ns+"/"+f.ServiceAccount.Name] && f.ServiceAccount.Name != "default" {
						add(Finding{Severity: Warning, Object: ref, Field: field + ".serviceAccount", Reason: ReasonUnknownIdentity,
							Message: fmt.Sprintf("ServiceAccount %s/%s is not among the manifests' ServiceAccounts of that namespace: this rule matches no caller unless it exists elsewhere", ns, f.ServiceAccount.Name)})
					}
				}
				if f.Namespace != nil && *f.Namespace != "*" && len(nss) > 0 && !nss[*f.Namespace] {
					add(Finding{Severity: Warning, Object: ref, Field: field + ".namespace", Reason: ReasonUnknownIdentity,
						Message: fmt.Sprintf("namespace %q is not among the manifests' Namespaces: this rule matches no caller unless it exists elsewhere", *f.Namespace)})
				}
			}
		}
	}
}

// misgrouped reports parentRefs of kind Service without group "": the
// validating webhook only warns (routes are not Trellis's), but the route
// does nothing for that parent.
func misgrouped(ref model.Ref, refs []gwv1.ParentReference, add func(Finding)) {
	for _, i := range model.MisgroupedServiceParents(refs) {
		add(Finding{Severity: Error, Object: ref, Field: fmt.Sprintf("spec.parentRefs[%d].group", i), Reason: ReasonParentGroup, Message: model.MisgroupedServiceParentMessage(refs[i])})
	}
}
