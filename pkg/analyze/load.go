// Package analyze finds what is wrong with a mesh's configuration before
// (or without) a cluster: it loads Kubernetes manifests, stands in for the
// cluster where the mesh needs it (the injection webhook runs on pods made
// from workload templates, Services get cluster IPs and EndpointSlices as
// the apiserver and the EndpointSlice controller would give them), builds
// the mesh model, translates it for every meshed workload and reports the
// model's and translator's problems — the ones status conditions carry —
// plus checks for what users commonly get wrong.
package analyze

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// Objects are the manifests read, by kind. The embedded Input holds the
// kinds the mesh reads as they are written (no stand-ins yet).
type Objects struct {
	model.Input
	Namespaces      []*corev1.Namespace
	ServiceAccounts []*corev1.ServiceAccount
	Workloads       []Workload
	// Skipped counts documents of kinds the mesh does not read, by kind.
	Skipped map[string]int
}

// Workload is a controller's pod template (Deployment, StatefulSet,
// DaemonSet, ReplicaSet, Job, CronJob).
type Workload struct {
	Kind     string
	Meta     metav1.ObjectMeta
	Template corev1.PodTemplateSpec
}

// Ref names the workload.
func (w Workload) Ref() model.Ref {
	return model.Ref{Kind: w.Kind, Namespace: w.Meta.Namespace, Name: w.Meta.Name}
}

// Load reads every .yaml, .yml and .json file under paths (files or
// directories, recursively; "-" is standard input). Namespaced objects
// without a namespace get defaultNamespace, as kubectl apply -n would give
// them. A document that does not decode (a typo'd field, a wrong type) is
// reported as an error finding and left out; the rest is still analysed.
func Load(paths []string, defaultNamespace string, stdin io.Reader) (*Objects, []Finding, error) {
	o := &Objects{Skipped: map[string]int{}}
	var findings []Finding
	for _, p := range paths {
		if p == "-" {
			data, err := io.ReadAll(stdin)
			if err != nil {
				return nil, nil, err
			}
			findings = append(findings, o.parse("<stdin>", data, defaultNamespace)...)
			continue
		}
		var files []string
		err := filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				return nil
			}
			switch strings.ToLower(filepath.Ext(path)) {
			case ".yaml", ".yml", ".json":
				files = append(files, path)
			default:
				if path == p { // named explicitly: read whatever it is
					files = append(files, path)
				}
			}
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
		slices.Sort(files)
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return nil, nil, err
			}
			findings = append(findings, o.parse(f, data, defaultNamespace)...)
		}
	}
	return o, findings, nil
}

func (o *Objects) parse(file string, data []byte, defaultNamespace string) []Finding {
	var findings []Finding
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return findings
		}
		source := fmt.Sprintf("%s#%d", file, i)
		if err != nil {
			return append(findings, Finding{Severity: Error, Reason: "InvalidYAML", Source: source, Message: err.Error()})
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
			Items []any `json:"items"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			findings = append(findings, Finding{Severity: Error, Reason: "InvalidYAML", Source: source, Message: err.Error()})
			continue
		}
		if head.Kind == "" && len(bytes.TrimSpace(doc)) > 0 {
			findings = append(findings, Finding{Severity: Error, Reason: "InvalidYAML", Source: source, Message: "document has no kind"})
			continue
		}
		ref := model.Ref{Kind: head.Kind, Namespace: head.Metadata.Namespace, Name: head.Metadata.Name}
		if err := o.add(head.APIVersion, head.Kind, doc, defaultNamespace); err != nil {
			msg := strings.TrimPrefix(err.Error(), "error unmarshaling JSON: while decoding JSON: ")
			findings = append(findings, Finding{Severity: Error, Object: ref, Reason: "InvalidObject", Source: source,
				Message: msg + " (the apiserver would refuse it; the object is left out of the analysis)"})
		}
	}
}

// decode decodes strictly (unknown fields are errors, as kubectl's
// server-side field validation makes them) and defaults the namespace.
func decode[T any](doc []byte, ns *string, defaultNamespace string) (*T, error) {
	v := new(T)
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		return nil, err
	}
	if ns != nil && *ns == "" {
		*ns = defaultNamespace
	}
	return v, nil
}

func (o *Objects) add(apiVersion, kind string, doc []byte, dns string) error {
	group, _, _ := strings.Cut(apiVersion, "/")
	if !strings.Contains(apiVersion, "/") {
		group = ""
	}
	var err error
	switch {
	case group == "" && kind == "Namespace":
		var v *corev1.Namespace
		if v, err = decode[corev1.Namespace](doc, nil, dns); err == nil {
			o.Namespaces = append(o.Namespaces, v)
		}
	case group == "" && kind == "ServiceAccount":
		err = addNS(doc, dns, &o.ServiceAccounts, func(v *corev1.ServiceAccount) *string { return &v.Namespace })
	case group == "" && kind == "Service":
		err = addNS(doc, dns, &o.Services, func(v *corev1.Service) *string { return &v.Namespace })
	case group == "" && kind == "Pod":
		err = addNS(doc, dns, &o.Pods, func(v *corev1.Pod) *string { return &v.Namespace })
	case group == "discovery.k8s.io" && kind == "EndpointSlice":
		err = addNS(doc, dns, &o.EndpointSlices, func(v *discoveryv1.EndpointSlice) *string { return &v.Namespace })
	case group == "apps" && kind == "Deployment":
		err = addWorkload(o, kind, doc, dns, func(v *appsv1.Deployment) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.Template
		})
	case group == "apps" && kind == "StatefulSet":
		err = addWorkload(o, kind, doc, dns, func(v *appsv1.StatefulSet) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.Template
		})
	case group == "apps" && kind == "DaemonSet":
		err = addWorkload(o, kind, doc, dns, func(v *appsv1.DaemonSet) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.Template
		})
	case group == "apps" && kind == "ReplicaSet":
		err = addWorkload(o, kind, doc, dns, func(v *appsv1.ReplicaSet) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.Template
		})
	case group == "batch" && kind == "Job":
		err = addWorkload(o, kind, doc, dns, func(v *batchv1.Job) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.Template
		})
	case group == "batch" && kind == "CronJob":
		err = addWorkload(o, kind, doc, dns, func(v *batchv1.CronJob) (*metav1.ObjectMeta, corev1.PodTemplateSpec) {
			return &v.ObjectMeta, v.Spec.JobTemplate.Spec.Template
		})
	case group == meshv1alpha1.GroupVersion.Group && kind == "MeshConfig":
		o.MeshConfig, err = decode[meshv1alpha1.MeshConfig](doc, nil, dns)
	case group == meshv1alpha1.GroupVersion.Group && kind == "AccessPolicy":
		err = addNS(doc, dns, &o.AccessPolicies, func(v *meshv1alpha1.AccessPolicy) *string { return &v.Namespace })
	case group == meshv1alpha1.GroupVersion.Group && kind == "BackendPolicy":
		err = addNS(doc, dns, &o.BackendPolicies, func(v *meshv1alpha1.BackendPolicy) *string { return &v.Namespace })
	case group == meshv1alpha1.GroupVersion.Group && kind == "ExternalService":
		err = addNS(doc, dns, &o.ExternalServices, func(v *meshv1alpha1.ExternalService) *string { return &v.Namespace })
	case group == gwv1.GroupName && kind == "HTTPRoute":
		err = addNS(doc, dns, &o.HTTPRoutes, func(v *gwv1.HTTPRoute) *string { return &v.Namespace })
	case group == gwv1.GroupName && kind == "GRPCRoute":
		err = addNS(doc, dns, &o.GRPCRoutes, func(v *gwv1.GRPCRoute) *string { return &v.Namespace })
	case group == gwv1.GroupName && kind == "ReferenceGrant":
		// v1beta1 and v1 have the same shape.
		err = addNS(doc, dns, &o.ReferenceGrants, func(v *gwv1.ReferenceGrant) *string { return &v.Namespace })
	default:
		o.Skipped[kind]++
	}
	return err
}

// addWorkload decodes a workload kind and keeps its pod template.
func addWorkload[T any](o *Objects, kind string, doc []byte, dns string, parts func(*T) (*metav1.ObjectMeta, corev1.PodTemplateSpec)) error {
	v, err := decodeNS(doc, dns, func(v *T) *string { m, _ := parts(v); return &m.Namespace })
	if err == nil {
		m, tpl := parts(v)
		o.Workloads = append(o.Workloads, Workload{Kind: kind, Meta: *m, Template: tpl})
	}
	return err
}

func decodeNS[T any](doc []byte, dns string, ns func(*T) *string) (*T, error) {
	v := new(T)
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		return nil, err
	}
	if p := ns(v); *p == "" {
		*p = dns
	}
	return v, nil
}

func addNS[T any](doc []byte, dns string, into *[]*T, ns func(*T) *string) error {
	v, err := decodeNS(doc, dns, ns)
	if err == nil {
		*into = append(*into, v)
	}
	return err
}
