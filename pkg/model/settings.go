package model

import (
	"k8s.io/utils/ptr"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// Settings are the mesh-wide choices the data-plane configuration is
// built from, resolved from the (defaulted) MeshConfig.
type Settings struct {
	TrustDomain string `json:"trustDomain"`
	// Permissive: inbound ports accept plaintext besides mTLS.
	Permissive bool `json:"permissive,omitempty"`
	// RegistryOnly: calls to destinations outside the registry (Services,
	// ExternalServices) fail; else they pass through.
	RegistryOnly bool `json:"registryOnly,omitempty"`
	// DenyByDefault: a Service no Allow AccessPolicy targets accepts no
	// request.
	DenyByDefault bool       `json:"denyByDefault,omitempty"`
	AccessLog     *AccessLog `json:"accessLog,omitempty"`
	Tracing       *Tracing   `json:"tracing,omitempty"`
}

// AccessLog writes one line per request or connection to stdout.
type AccessLog struct {
	// JSON lines; else Envoy's text format.
	JSON bool `json:"json,omitempty"`
}

// Tracing sends OpenTelemetry spans to Collector ("name.namespace:port").
type Tracing struct {
	Collector       string `json:"collector"`
	SamplingPercent int32  `json:"samplingPercent"`
}

func settings(c meshv1alpha1.MeshConfigSpec) Settings {
	s := Settings{
		TrustDomain:   c.TrustDomain,
		Permissive:    c.MTLS.Mode == meshv1alpha1.MTLSPermissive,
		RegistryOnly:  c.OutboundPolicy == meshv1alpha1.OutboundRegistryOnly,
		DenyByDefault: c.DefaultAccess == meshv1alpha1.DefaultAccessDeny,
	}
	if c.AccessLog != nil {
		s.AccessLog = &AccessLog{JSON: c.AccessLog.Encoding == "JSON"}
	}
	if c.Tracing != nil {
		s.Tracing = &Tracing{Collector: c.Tracing.Collector, SamplingPercent: ptr.Deref(c.Tracing.SamplingPercent, 1)}
	}
	return s
}
