package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MeshConfigName is the only name a MeshConfig may have.
const MeshConfigName = "default"

// MTLSMode says whether meshed workloads accept plaintext.
// +kubebuilder:validation:Enum=Strict;Permissive
type MTLSMode string

const (
	// MTLSStrict: inbound listeners accept only mutual TLS from the mesh.
	MTLSStrict MTLSMode = "Strict"
	// MTLSPermissive: inbound listeners accept mutual TLS and plaintext, for
	// migrating workloads into the mesh.
	MTLSPermissive MTLSMode = "Permissive"
)

// OutboundPolicy says where workloads may connect outside the registry.
// +kubebuilder:validation:Enum=AllowAny;RegistryOnly
type OutboundPolicy string

const (
	// OutboundAllowAny passes unknown destinations through unchanged.
	OutboundAllowAny OutboundPolicy = "AllowAny"
	// OutboundRegistryOnly refuses destinations that are neither a Service
	// nor an ExternalService.
	OutboundRegistryOnly OutboundPolicy = "RegistryOnly"
)

// DefaultAccess is the authorization decision for a Service no Allow
// AccessPolicy targets.
// +kubebuilder:validation:Enum=Allow;Deny
type DefaultAccess string

const (
	DefaultAccessAllow DefaultAccess = "Allow"
	DefaultAccessDeny  DefaultAccess = "Deny"
)

// IssuerType selects the certificate authority backend.
// +kubebuilder:validation:Enum=BuiltIn;CertManager
type IssuerType string

const (
	// IssuerBuiltIn: the controller's own CA, its root kept in a Secret in
	// the control plane's namespace.
	IssuerBuiltIn IssuerType = "BuiltIn"
	// IssuerCertManager: workload certificates are requested from a
	// cert-manager Issuer or ClusterIssuer through CertificateRequests.
	IssuerCertManager IssuerType = "CertManager"
)

// MeshConfig is the cluster-wide configuration of the mesh. There is one,
// named "default".
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=mc
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="mTLS",type=string,JSONPath=`.spec.mtls.mode`
// +kubebuilder:printcolumn:name="Root rotation",type=string,JSONPath=`.status.rootRotation.phase`,priority=1
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=`.status.conditions[?(@.type=="Programmed")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name == 'default'",message="metadata.name must be 'default': MeshConfig is a singleton (one per cluster)"
type MeshConfig struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +kubebuilder:default={}
	Spec   MeshConfigSpec   `json:"spec"`
	Status MeshConfigStatus `json:"status,omitempty"`
}

// MeshConfigSpec is the desired configuration of the whole mesh.
type MeshConfigSpec struct {
	// MTLS configures mutual TLS between meshed workloads.
	// +kubebuilder:default={}
	// +optional
	MTLS MTLS `json:"mtls,omitzero"`

	// TrustDomain is the SPIFFE trust domain of workload identities:
	// spiffe://<trustDomain>/ns/<namespace>/sa/<serviceaccount>.
	// +kubebuilder:default="cluster.local"
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="trustDomain is immutable: changing it would invalidate every workload identity"
	// +optional
	TrustDomain string `json:"trustDomain,omitempty"`

	// Certificates configures workload certificate lifetime and rotation.
	// +kubebuilder:default={}
	// +optional
	Certificates Certificates `json:"certificates,omitzero"`

	// Issuer selects the certificate authority.
	// +kubebuilder:default={}
	// +optional
	Issuer Issuer `json:"issuer,omitzero"`

	// Sidecar configures the injected Envoy container.
	// +kubebuilder:default={}
	// +optional
	Sidecar Sidecar `json:"sidecar,omitzero"`

	// OutboundPolicy: AllowAny passes unknown destinations through;
	// RegistryOnly refuses anything that is not a Service or ExternalService.
	// +kubebuilder:default=AllowAny
	// +optional
	OutboundPolicy OutboundPolicy `json:"outboundPolicy,omitempty"`

	// DefaultAccess is the decision for requests to a Service that no Allow
	// AccessPolicy targets. Deny makes the mesh default-deny.
	// +kubebuilder:default=Allow
	// +optional
	DefaultAccess DefaultAccess `json:"defaultAccess,omitempty"`

	// AccessLog configures sidecar access logs on standard output.
	// +optional
	AccessLog *AccessLog `json:"accessLog,omitempty"`

	// Tracing configures OpenTelemetry tracing from the sidecars.
	// +optional
	Tracing *Tracing `json:"tracing,omitempty"`
}

// MTLS configures mutual TLS.
type MTLS struct {
	// Mode is Strict (only mTLS is accepted inbound) or Permissive (mTLS and
	// plaintext are both accepted).
	// +kubebuilder:default=Strict
	// +optional
	Mode MTLSMode `json:"mode,omitempty"`
}

// Certificates configures workload certificates (X.509 SVIDs).
// +kubebuilder:validation:XValidation:rule="!has(self.lifetime) || (duration(self.lifetime) >= duration('2m') && duration(self.lifetime) <= duration('720h'))",message="certificates.lifetime must be between 2m and 720h (30 days)"
type Certificates struct {
	// Lifetime of a workload certificate.
	// +kubebuilder:default="24h"
	// +optional
	Lifetime Duration `json:"lifetime,omitempty"`

	// RotationPercent is the share of the lifetime after which a certificate
	// is renewed; up to 10 more points of jitter are added per certificate.
	// +kubebuilder:default=50
	// +kubebuilder:validation:Minimum=10
	// +kubebuilder:validation:Maximum=80
	// +optional
	RotationPercent int32 `json:"rotationPercent,omitempty"`
}

// Issuer selects the certificate authority backend.
// +kubebuilder:validation:XValidation:rule="(has(self.type) && self.type == 'CertManager') == has(self.certManager)",message="issuer.certManager must be set exactly when issuer.type is CertManager"
type Issuer struct {
	// Type is BuiltIn or CertManager.
	// +kubebuilder:default=BuiltIn
	// +optional
	Type IssuerType `json:"type,omitempty"`

	// CertManager names the cert-manager issuer that signs workload
	// certificates.
	// +optional
	CertManager *CertManagerIssuer `json:"certManager,omitempty"`
}

// CertManagerIssuer references a cert-manager Issuer or ClusterIssuer.
type CertManagerIssuer struct {
	// IssuerRef is the cert-manager issuer; an Issuer must live in the
	// control plane's namespace.
	IssuerRef IssuerReference `json:"issuerRef"`
}

// IssuerReference mirrors cert-manager's ObjectReference for issuers.
type IssuerReference struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// +kubebuilder:validation:Enum=Issuer;ClusterIssuer
	// +kubebuilder:default=Issuer
	// +optional
	Kind string `json:"kind,omitempty"`
	// +kubebuilder:default="cert-manager.io"
	// +kubebuilder:validation:MaxLength=253
	// +optional
	Group string `json:"group,omitempty"`
}

// LogLevel of the Envoy sidecar.
// +kubebuilder:validation:Enum=trace;debug;info;warning;error;critical;off
type LogLevel string

// Sidecar configures the injected Envoy.
type Sidecar struct {
	// Image of the stock Envoy proxy.
	// +kubebuilder:default="envoyproxy/envoy:v1.40.0"
	// +kubebuilder:validation:MinLength=1
	// +optional
	Image string `json:"image,omitempty"`
	// Resources of the sidecar container; pods may override them with the
	// trellis.dev/proxy-cpu and trellis.dev/proxy-memory annotations.
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`
	// LogLevel of Envoy.
	// +kubebuilder:default=warning
	// +optional
	LogLevel LogLevel `json:"logLevel,omitempty"`
}

// AccessLogEncoding is the format of access log lines.
// +kubebuilder:validation:Enum=Text;JSON
type AccessLogEncoding string

// AccessLog configures access logs on the sidecar's standard output.
type AccessLog struct {
	// Encoding is Text (one documented format string) or JSON.
	// +kubebuilder:default=Text
	// +optional
	Encoding AccessLogEncoding `json:"encoding,omitempty"`
}

// Tracing configures OpenTelemetry tracing.
type Tracing struct {
	// Collector is the OTLP/gRPC collector, as a Service's
	// "name.namespace:port", e.g. "otel-collector.observability:4317".
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?:[0-9]{1,5}$`
	Collector string `json:"collector"`
	// SamplingPercent of requests traced; 0 traces only requests that
	// arrive with a sampled trace context.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	// +optional
	SamplingPercent *int32 `json:"samplingPercent,omitempty"`
}

// MeshConfigStatus is the observed state of the mesh configuration.
type MeshConfigStatus struct {
	Status `json:",inline"`
	// TrustDomain is the trust domain in force: the mesh's certificates and
	// SAN checks use it. A MeshConfig re-created with another is refused
	// (Accepted=False TrustDomainChangeRefused) and this stays; a
	// restarted controller reads it from here.
	// +optional
	TrustDomain string `json:"trustDomain,omitempty"`
	// RootRotation reports the built-in CA's root rotation, started by
	// creating the Secret trellis-ca-next in the control plane's namespace.
	// +optional
	RootRotation *RootRotationStatus `json:"rootRotation,omitempty"`
}

// RootRotationPhase is a step of a root rotation.
// +kubebuilder:validation:Enum=Overlap;Reissue;Complete
type RootRotationPhase string

const (
	// RootOverlap: workloads trust the old and the new root; the old one signs.
	RootOverlap RootRotationPhase = "Overlap"
	// RootReissue: the new root signs and every connected workload is
	// re-issued; both roots are still trusted.
	RootReissue RootRotationPhase = "Reissue"
	// RootComplete: the new root is the only root.
	RootComplete RootRotationPhase = "Complete"
)

// RootRotationStatus is the state of a root rotation.
type RootRotationStatus struct {
	Phase RootRotationPhase `json:"phase"`
	// Since is when the phase began.
	Since metav1.Time `json:"since"`
	// From and To are SHA-256 fingerprints of the old and new root.
	From string `json:"from"`
	To   string `json:"to"`
}

// MeshConfigList is a list of MeshConfig.
// +kubebuilder:object:root=true
type MeshConfigList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []MeshConfig `json:"items"`
}
