package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// ExternalProtocol is the protocol of an external port.
// +kubebuilder:validation:Enum=HTTP;TLS;TCP
type ExternalProtocol string

const (
	// ExternalHTTP: plaintext HTTP, matched by Host header.
	ExternalHTTP ExternalProtocol = "HTTP"
	// ExternalTLS: TLS the application originates, matched by SNI.
	ExternalTLS ExternalProtocol = "TLS"
	// ExternalTCP: opaque TCP, matched by destination address.
	ExternalTCP ExternalProtocol = "TCP"
)

// ExternalService declares hosts outside the mesh that workloads may reach
// when MeshConfig's outboundPolicy is RegistryOnly, optionally with the
// sidecar originating TLS so the application can speak plaintext.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=es
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Hosts",type=string,JSONPath=`.spec.hosts`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=`.status.conditions[?(@.type=="Programmed")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ExternalService struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ExternalServiceSpec `json:"spec"`
	Status PolicyStatus        `json:"status,omitempty"`
}

// ExternalServiceSpec lists the external hosts and ports.
// +kubebuilder:validation:XValidation:rule="!self.ports.exists(p, p.protocol == 'TCP') || (has(self.addresses) && size(self.addresses) > 0)",message="addresses are required when a port has protocol TCP: opaque TCP can only be matched by destination address",fieldPath=".addresses"
type ExternalServiceSpec struct {
	// Hosts are DNS names, resolved by the sidecar.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=253
	// +kubebuilder:validation:items:XValidation:rule="!self.startsWith('*')",message="wildcard hosts are not supported: list each host, e.g. api.example.com"
	// +kubebuilder:validation:items:XValidation:rule="!self.contains('/')",message="give a host name, not a URL: e.g. api.example.com for https://api.example.com/v1 (ports go in spec.ports)"
	// +kubebuilder:validation:items:XValidation:rule="self.contains('/') || !self.contains(':')",message="no port in a host: e.g. api.example.com, with the port in spec.ports"
	// +kubebuilder:validation:items:XValidation:rule="self.startsWith('*') || self.contains('/') || self.contains(':') || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$')",message="a host is a lower-case DNS name with at least one dot, e.g. api.example.com"
	// +listType=set
	Hosts []string `json:"hosts"`

	// Addresses (CIDRs) the hosts resolve to; required for TCP ports.
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self)",message="each address must be a CIDR such as 203.0.113.0/24"
	// +kubebuilder:validation:items:MaxLength=64
	// +listType=set
	// +optional
	Addresses []string `json:"addresses,omitempty"`

	// Ports reachable on the hosts.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +listType=map
	// +listMapKey=number
	Ports []ExternalPort `json:"ports"`
}

// ExternalPort is one port of an external service.
// +kubebuilder:validation:XValidation:rule="!has(self.tls) || self.protocol == 'HTTP'",message="tls origination applies to HTTP ports only: the sidecar cannot originate TLS for TLS or TCP traffic",fieldPath=".tls"
type ExternalPort struct {
	// Number the application connects to.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Number int32 `json:"number"`
	// Protocol is HTTP, TLS or TCP.
	Protocol ExternalProtocol `json:"protocol"`
	// TargetPort on the external host; defaults to number. With tls set
	// this is usually 443.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +optional
	TargetPort *int32 `json:"targetPort,omitempty"`
	// TLS makes the sidecar originate TLS to the host: the application
	// speaks plaintext HTTP on number and the sidecar connects with TLS to
	// targetPort, verifying the host's certificate against the system roots.
	// +optional
	TLS *TLSOrigination `json:"tls,omitempty"`
}

// TLSOrigination configures TLS from the sidecar to an external host.
type TLSOrigination struct {
	// SNI sent to the host; defaults to the requested host name.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	SNI string `json:"sni,omitempty"`
}

// ExternalServiceList is a list of ExternalService.
// +kubebuilder:object:root=true
type ExternalServiceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ExternalService `json:"items"`
}
