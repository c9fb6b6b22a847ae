// Package testgen builds Kubernetes objects for tests with functional
// options, so tests state only what matters to them.
package testgen

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// PodOption changes a pod.
type PodOption func(*corev1.Pod)

// Pod is a pod with one container, meshed with an Envoy sidecar unless an
// option says otherwise.
func Pod(ns, name string, opts ...PodOption) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: map[string]string{"trellis.dev/proxy": "envoy"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "default", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

// WithServiceAccount sets the pod's ServiceAccount.
func WithServiceAccount(sa string) PodOption {
	return func(p *corev1.Pod) { p.Spec.ServiceAccountName = sa }
}

// WithIP sets the pod's IP in its status.
func WithIP(ip string) PodOption {
	return func(p *corev1.Pod) {
		p.Status.PodIP = ip
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
		p.Status.Phase = corev1.PodRunning
	}
}

// WithLabel adds a label.
func WithLabel(k, v string) PodOption {
	return func(p *corev1.Pod) {
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		p.Labels[k] = v
	}
}

// WithProxy sets the proxy mode annotation ("" removes it).
func WithProxy(mode string) PodOption {
	return func(p *corev1.Pod) {
		if mode == "" {
			delete(p.Annotations, "trellis.dev/proxy")
		} else {
			p.Annotations["trellis.dev/proxy"] = mode
		}
	}
}

// Service is a ClusterIP Service; clusterIP "" lets the apiserver allocate one.
func Service(ns, name, clusterIP string, ports ...corev1.ServicePort) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.ServiceSpec{ClusterIP: clusterIP, Ports: ports},
	}
	if clusterIP != "" {
		s.Spec.ClusterIPs = []string{clusterIP}
	}
	return s
}

// Port is a Service port.
func Port(name string, port, target int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, TargetPort: intstr.FromInt32(target), Protocol: corev1.ProtocolTCP}
}

// Endpoint is one address of a slice, backed by a pod.
type Endpoint struct {
	IP, Pod  string
	NotReady bool
}

// EndpointSlice lists ready endpoints for a Service port.
func EndpointSlice(ns, service, name, portName string, port int32, eps ...Endpoint) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port}},
	}
	for _, e := range eps {
		ready := !e.NotReady
		ep := discoveryv1.Endpoint{Addresses: []string{e.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}
		if e.Pod != "" {
			ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: e.Pod}
		}
		es.Endpoints = append(es.Endpoints, ep)
	}
	return es
}
