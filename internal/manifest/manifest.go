// Package manifest reads test inputs: multi-document YAML of Kubernetes
// objects (core, discovery, Gateway API and Trellis kinds) into a
// model.Input, rejecting unknown fields so a typo in a test cannot pass
// silently.
package manifest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// Header is the first document of a test case when it has no kind.
type Header struct {
	// Proxy is the workload, "namespace/pod", whose configuration is built.
	Proxy string `json:"proxy"`
	// Description says what the case shows.
	Description string `json:"description,omitempty"`
	// OnDemand are clusters the proxy discovers on demand (pod-IP
	// clusters, "podip|<ip>:<port>"): the case's output includes them as
	// the control plane resolves them.
	OnDemand []string `json:"onDemand,omitempty"`
}

// ReadFile reads a test case file.
func ReadFile(path string) (model.Input, Header, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return model.Input{}, Header{}, err
	}
	return Parse(b)
}

// Parse parses multi-document YAML.
func Parse(data []byte) (model.Input, Header, error) {
	var in model.Input
	var h Header
	r := utilyaml.NewYAMLReader(bufioReader(data))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return in, h, nil
		}
		if err != nil {
			return in, h, err
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return in, h, fmt.Errorf("document %d: %w", i, err)
		}
		if err := add(&in, &h, meta.Kind, doc); err != nil {
			return in, h, fmt.Errorf("document %d (%s): %w", i, meta.Kind, err)
		}
	}
}

func decode[T any](doc []byte) (*T, error) {
	v := new(T)
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		return nil, err
	}
	return v, nil
}

func add(in *model.Input, h *Header, kind string, doc []byte) error {
	var err error
	switch kind {
	case "":
		var hh *Header
		if hh, err = decode[Header](doc); err == nil {
			*h = *hh
		}
	case "MeshConfig":
		in.MeshConfig, err = decode[meshv1alpha1.MeshConfig](doc)
	case "Service":
		var o *corev1.Service
		if o, err = decode[corev1.Service](doc); err == nil {
			in.Services = append(in.Services, o)
		}
	case "EndpointSlice":
		var o *discoveryv1.EndpointSlice
		if o, err = decode[discoveryv1.EndpointSlice](doc); err == nil {
			in.EndpointSlices = append(in.EndpointSlices, o)
		}
	case "Pod":
		var o *corev1.Pod
		if o, err = decode[corev1.Pod](doc); err == nil {
			in.Pods = append(in.Pods, o)
		}
	case "Node":
		// Only the pod CIDRs matter to the model.
		var o *corev1.Node
		if o, err = decode[corev1.Node](doc); err == nil {
			in.PodCIDRs = append(in.PodCIDRs, o.Spec.PodCIDRs...)
		}
	case "AccessPolicy":
		var o *meshv1alpha1.AccessPolicy
		if o, err = decode[meshv1alpha1.AccessPolicy](doc); err == nil {
			in.AccessPolicies = append(in.AccessPolicies, o)
		}
	case "BackendPolicy":
		var o *meshv1alpha1.BackendPolicy
		if o, err = decode[meshv1alpha1.BackendPolicy](doc); err == nil {
			in.BackendPolicies = append(in.BackendPolicies, o)
		}
	case "ExternalService":
		var o *meshv1alpha1.ExternalService
		if o, err = decode[meshv1alpha1.ExternalService](doc); err == nil {
			in.ExternalServices = append(in.ExternalServices, o)
		}
	case "HTTPRoute":
		var o *gwv1.HTTPRoute
		if o, err = decode[gwv1.HTTPRoute](doc); err == nil {
			in.HTTPRoutes = append(in.HTTPRoutes, o)
		}
	case "GRPCRoute":
		var o *gwv1.GRPCRoute
		if o, err = decode[gwv1.GRPCRoute](doc); err == nil {
			in.GRPCRoutes = append(in.GRPCRoutes, o)
		}
	case "ReferenceGrant":
		var o *gwv1.ReferenceGrant
		if o, err = decode[gwv1.ReferenceGrant](doc); err == nil {
			in.ReferenceGrants = append(in.ReferenceGrants, o)
		}
	default:
		return fmt.Errorf("unsupported kind %q", kind)
	}
	return err
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }
