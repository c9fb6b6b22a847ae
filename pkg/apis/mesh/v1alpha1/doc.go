// Package v1alpha1 holds the Trellis mesh API (group mesh.trellis.dev): the
// kinds Gateway API's mesh profile (GAMMA) does not express. MeshConfig is the
// cluster-wide singleton; AccessPolicy, BackendPolicy and ExternalService are
// namespaced and attach to Services through targetRefs (GEP-713 shape).
//
// The kubebuilder markers here are the single source of truth for the CRD
// manifests in config/crd and the chart; `make manifests generate` rebuilds
// them and the deepcopy functions.
//
// +kubebuilder:object:generate=true
// +groupName=mesh.trellis.dev
package v1alpha1
