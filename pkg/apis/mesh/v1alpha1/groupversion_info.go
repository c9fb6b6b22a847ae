package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of the Trellis mesh API.
var GroupVersion = schema.GroupVersion{Group: "mesh.trellis.dev", Version: "v1alpha1"}

// AddToScheme registers the Trellis kinds with a scheme. It is wired
// explicitly by callers; nothing registers itself from init().
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&MeshConfig{}, &MeshConfigList{},
		&AccessPolicy{}, &AccessPolicyList{},
		&BackendPolicy{}, &BackendPolicyList{},
		&ExternalService{}, &ExternalServiceList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
