package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types written on every Trellis object, as Gateway API does.
const (
	// ConditionAccepted says whether the object is valid and was taken into
	// the mesh model.
	ConditionAccepted = "Accepted"
	// ConditionResolvedRefs says whether every reference (targetRefs,
	// issuers, ConfigMaps) resolved to an existing object.
	ConditionResolvedRefs = "ResolvedRefs"
	// ConditionProgrammed says whether the configuration derived from the
	// object has been computed and handed to the xDS server.
	ConditionProgrammed = "Programmed"
)

// Condition reasons.
const (
	ReasonAccepted       = "Accepted"
	ReasonInvalid        = "Invalid"
	ReasonConflicted     = "Conflicted"
	ReasonResolvedRefs   = "ResolvedRefs"
	ReasonTargetNotFound = "TargetNotFound"
	ReasonProgrammed     = "Programmed"
	ReasonPending        = "Pending"
	// ReasonRejectedByProxy: proxies rejected (NACKed) configuration that
	// comes from the object and keep running what they had before.
	ReasonRejectedByProxy = "RejectedByProxy"
	// ReasonTrustDomainChangeRefused: a MeshConfig names another trust
	// domain than the one the mesh's certificates and SAN checks use; the
	// old one stays in force.
	ReasonTrustDomainChangeRefused = "TrustDomainChangeRefused"
	// ReasonCARootMissing (Programmed=False on MeshConfig): the built-in
	// CA's root Secret was missing when no replica held the root, and a new
	// root replaced the one workloads trust (see the message for what to do).
	ReasonCARootMissing = "CARootMissing"
)

// Duration is a time span in Go's notation restricted to hours, minutes,
// seconds and milliseconds, e.g. "1.5s" is not allowed but "1500ms" is; the
// same shape as Gateway API's Duration (GEP-2257) so CEL's duration() reads it.
//
// +kubebuilder:validation:MaxLength=32
// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$')",message="a duration such as 500ms, 10s, 1m30s or 2h: whole numbers with units h, m, s or ms (no decimals, no spaces)"
type Duration string

// PolicyTargetReference names the Service a policy attaches to, in the
// policy's namespace (Gateway API GEP-713 LocalPolicyTargetReference).
type PolicyTargetReference struct {
	// Group of the target; only the core group ("") is supported.
	// +kubebuilder:validation:Enum=""
	// +kubebuilder:default=""
	// +optional
	Group string `json:"group,omitempty"`
	// Kind of the target; only Service is supported.
	// +kubebuilder:validation:Enum=Service
	// +kubebuilder:default=Service
	// +optional
	Kind string `json:"kind,omitempty"`
	// Name of the Service.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z]([-a-z0-9]*[a-z0-9])?$`
	Name string `json:"name"`
}

// Status is the status shared by every Trellis kind.
type Status struct {
	// ObservedGeneration is the metadata.generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Accepted, ResolvedRefs and Programmed.
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}
