package inject

import (
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// AnnotationRewriteProbes set to "false" leaves the pod's probes alone.
const AnnotationRewriteProbes = "trellis.dev/rewrite-probes"

// rewriteProbes points the HTTP, TCP and gRPC probes of the application
// containers at /app-health/<container>/<livez|readyz|startupz> on the
// sidecar's stats port and records the originals in the probes annotation,
// from which the translator builds the routes that answer them
// (docs/translator.md, "Probes"). Exec probes, probes of another host and
// probes of ports that cannot be resolved are left as they are (the last
// with a warning).
func rewriteProbes(p *corev1.Pod) []string {
	var warnings []string
	probes := map[string]model.AppProbe{}
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		if c.Name == ProxyContainer {
			continue // the fallback's proxy container: its probes are its own
		}
		for _, k := range []struct {
			kind  string
			probe **corev1.Probe
		}{{"livez", &c.LivenessProbe}, {"readyz", &c.ReadinessProbe}, {"startupz", &c.StartupProbe}} {
			pr := *k.probe
			if pr == nil {
				continue
			}
			ap, headers, ok, warning := original(c, pr)
			if warning != "" {
				warnings = append(warnings, warning)
			}
			if !ok {
				continue
			}
			ap.TimeoutSeconds, ap.PeriodSeconds = pr.TimeoutSeconds, pr.PeriodSeconds
			path := model.ProbePath(c.Name, k.kind)
			probes[path] = ap
			rewritten := pr.DeepCopy()
			rewritten.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: path, Port: intstr.FromInt32(15020), Scheme: corev1.URISchemeHTTP, HTTPHeaders: headers,
			}}
			*k.probe = rewritten
		}
	}
	if len(probes) > 0 {
		b, _ := json.Marshal(probes) // map keys are sorted: deterministic
		p.Annotations[model.AnnotationProbes] = string(b)
	}
	return warnings
}

// original returns what the probe checks, with its port resolved, and the
// headers the rewritten probe keeps sending (Envoy forwards them).
func original(c *corev1.Container, pr *corev1.Probe) (model.AppProbe, []corev1.HTTPHeader, bool, string) {
	resolve := func(port intstr.IntOrString) (int32, string) {
		if port.Type == intstr.Int {
			if port.IntVal < 1 || port.IntVal > 65535 {
				return 0, fmt.Sprintf("container %s: probe port %d is out of range; probe not rewritten", c.Name, port.IntVal)
			}
			return port.IntVal, ""
		}
		for _, cp := range c.Ports {
			if cp.Name == port.StrVal {
				return cp.ContainerPort, ""
			}
		}
		return 0, fmt.Sprintf("container %s: probe port %q names no port of the container; probe not rewritten", c.Name, port.StrVal)
	}
	switch {
	case pr.HTTPGet != nil && pr.HTTPGet.Host == "":
		port, w := resolve(pr.HTTPGet.Port)
		if w != "" {
			return model.AppProbe{}, nil, false, w
		}
		return model.AppProbe{HTTPGet: &model.ProbeHTTP{Path: pr.HTTPGet.Path, Port: port, Scheme: pr.HTTPGet.Scheme}}, pr.HTTPGet.HTTPHeaders, true, ""
	case pr.TCPSocket != nil && pr.TCPSocket.Host == "":
		port, w := resolve(pr.TCPSocket.Port)
		if w != "" {
			return model.AppProbe{}, nil, false, w
		}
		return model.AppProbe{TCPSocket: &model.ProbeTCP{Port: port}}, nil, true, ""
	case pr.GRPC != nil:
		port, w := resolve(intstr.FromInt32(pr.GRPC.Port))
		if w != "" {
			return model.AppProbe{}, nil, false, w
		}
		svc := ""
		if pr.GRPC.Service != nil {
			svc = *pr.GRPC.Service
		}
		return model.AppProbe{GRPC: &model.ProbeGRPC{Port: port, Service: svc}}, nil, true, ""
	}
	return model.AppProbe{}, nil, false, ""
}
