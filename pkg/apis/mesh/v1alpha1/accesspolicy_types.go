package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// AccessAction is what an AccessPolicy does with the requests its rules match.
// +kubebuilder:validation:Enum=Allow;Deny
type AccessAction string

const (
	AccessAllow AccessAction = "Allow"
	AccessDeny  AccessAction = "Deny"
)

// AccessPolicy authorizes requests to Services by the caller's identity. It is
// enforced on the server side by Envoy's RBAC filter.
//
// Evaluation for a request to a targeted Service: if any Deny policy's rule
// matches, the request is denied; otherwise if any Allow policy targets the
// Service, the request is allowed only when one of their rules matches;
// otherwise MeshConfig's defaultAccess decides.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=ap
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Action",type=string,JSONPath=`.spec.action`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=`.status.conditions[?(@.type=="Programmed")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type AccessPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   AccessPolicySpec `json:"spec"`
	Status PolicyStatus     `json:"status,omitempty"`
}

// AccessPolicySpec is the desired authorization for the target Services.
type AccessPolicySpec struct {
	// TargetRefs are the Services, in this namespace, the policy protects.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	TargetRefs []PolicyTargetReference `json:"targetRefs"`

	// Action taken when a rule matches.
	// +kubebuilder:default=Allow
	// +optional
	Action AccessAction `json:"action,omitempty"`

	// Rules: a request matches the policy when it matches any rule.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	// +listType=atomic
	Rules []AccessRule `json:"rules"`
}

// AccessRule matches requests whose source matches one of From (any source
// when empty) and whose operation matches one of To (any operation when
// empty).
// +kubebuilder:validation:XValidation:rule="(has(self.from) && size(self.from) > 0) || (has(self.to) && size(self.to) > 0)",message="a rule needs at least one of from or to; a rule matching everything is written as from: [{namespace: \"*\"}]",fieldPath=".from"
type AccessRule struct {
	// From lists the callers the rule matches.
	// +kubebuilder:validation:MaxItems=64
	// +listType=atomic
	// +optional
	From []AccessSource `json:"from,omitempty"`
	// To lists the operations the rule matches.
	// +kubebuilder:validation:MaxItems=64
	// +listType=atomic
	// +optional
	To []AccessOperation `json:"to,omitempty"`
}

// AccessSource is a caller identity: one ServiceAccount, or every workload of
// a namespace ("*" for every namespace). Identities come from the peer's
// mTLS certificate, so plaintext callers never match.
// +kubebuilder:validation:XValidation:rule="has(self.serviceAccount) != has(self.namespace)",message="set exactly one of serviceAccount or namespace"
type AccessSource struct {
	// ServiceAccount of the calling workload.
	// +optional
	ServiceAccount *ServiceAccountReference `json:"serviceAccount,omitempty"`
	// Namespace of the calling workloads, or "*" for any meshed caller.
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$`
	// +optional
	Namespace *string `json:"namespace,omitempty"`
}

// ServiceAccountReference names a ServiceAccount.
type ServiceAccountReference struct {
	// Namespace of the ServiceAccount; defaults to the policy's namespace.
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +optional
	Namespace string `json:"namespace,omitempty"`
	// Name of the ServiceAccount.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`
	Name string `json:"name"`
}

// AccessOperation matches what is requested. All set fields must match; an
// unset field matches anything. Paths and methods apply to HTTP and gRPC
// ports only: a rule with them never matches a TCP connection.
type AccessOperation struct {
	// Ports of the target Service (service ports, not container ports).
	// +kubebuilder:validation:MaxItems=16
	// +listType=set
	// +optional
	Ports []int32 `json:"ports,omitempty"`
	// Paths the request may have.
	// +kubebuilder:validation:MaxItems=32
	// +listType=atomic
	// +optional
	Paths []PathMatch `json:"paths,omitempty"`
	// Methods, e.g. GET, POST; for gRPC every call is POST.
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:Pattern=`^[A-Z]+$`
	// +listType=set
	// +optional
	Methods []string `json:"methods,omitempty"`
}

// PathMatchType is how a path is compared.
// +kubebuilder:validation:Enum=Exact;PathPrefix
type PathMatchType string

const (
	PathExact  PathMatchType = "Exact"
	PathPrefix PathMatchType = "PathPrefix"
)

// PathMatch matches a request path. PathPrefix matches whole segments as
// Gateway API does: "/api" matches "/api" and "/api/x", not "/apix".
type PathMatch struct {
	// +kubebuilder:default=PathPrefix
	// +optional
	Type PathMatchType `json:"type,omitempty"`
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:Pattern=`^/[^?#\s]*$`
	Value string `json:"value"`
}

// PolicyStatus is the status of a policy.
type PolicyStatus struct {
	Status `json:",inline"`
}

// AccessPolicyList is a list of AccessPolicy.
// +kubebuilder:object:root=true
type AccessPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AccessPolicy `json:"items"`
}
