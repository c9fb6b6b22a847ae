package model

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"

	corev1 "k8s.io/api/core/v1"
)

// AnnotationProbes carries the application probes the injector moved onto
// the sidecar's stats port: a JSON object from the path the kubelet now
// probes (/app-health/<container>/<livez|readyz|startupz>) to the original
// probe, its port resolved to a number. The injector writes it; the
// translator turns it into routes on port 15020.
const AnnotationProbes = "trellis.dev/probes"

// AppProbe is one application probe the sidecar answers for the kubelet.
// Exactly one of HTTPGet, TCPSocket and GRPC is set.
type AppProbe struct {
	HTTPGet        *ProbeHTTP `json:"httpGet,omitempty"`
	TCPSocket      *ProbeTCP  `json:"tcpSocket,omitempty"`
	GRPC           *ProbeGRPC `json:"grpc,omitempty"`
	TimeoutSeconds int32      `json:"timeoutSeconds,omitempty"`
	PeriodSeconds  int32      `json:"periodSeconds,omitempty"`
}

// ProbeHTTP is an HTTP GET probe of the application.
type ProbeHTTP struct {
	Path   string           `json:"path,omitempty"`
	Port   int32            `json:"port"`
	Scheme corev1.URIScheme `json:"scheme,omitempty"`
}

// HTTPS says whether the probe speaks TLS (without verifying the
// certificate, as the kubelet does).
func (h *ProbeHTTP) HTTPS() bool { return h.Scheme == corev1.URISchemeHTTPS }

// ProbeTCP is a TCP connect probe of the application.
type ProbeTCP struct {
	Port int32 `json:"port"`
}

// ProbeGRPC is a grpc.health.v1 probe of the application.
type ProbeGRPC struct {
	Port    int32  `json:"port"`
	Service string `json:"service,omitempty"`
}

// probePath is the shape of the paths the injector writes.
var probePath = regexp.MustCompile(`^/app-health/[a-z0-9]([-a-z0-9]*[a-z0-9])?/(livez|readyz|startupz)$`)

// ProbePath is the path on the stats port that stands for the probe kind
// ("livez", "readyz" or "startupz") of a container.
func ProbePath(container, kind string) string {
	return "/app-health/" + container + "/" + kind
}

// Port is the application port the probe reaches.
func (p AppProbe) Port() int32 {
	switch {
	case p.HTTPGet != nil:
		return p.HTTPGet.Port
	case p.TCPSocket != nil:
		return p.TCPSocket.Port
	case p.GRPC != nil:
		return p.GRPC.Port
	}
	return 0
}

// Timeout is the probe's timeout in seconds, with the kubelet's default.
func (p AppProbe) Timeout() int32 { return max(p.TimeoutSeconds, 1) }

// Period is the probe's period in seconds, with the kubelet's default.
func (p AppProbe) Period() int32 {
	if p.PeriodSeconds <= 0 {
		return 10
	}
	return p.PeriodSeconds
}

func (p AppProbe) validate() error {
	n := 0
	for _, set := range []bool{p.HTTPGet != nil, p.TCPSocket != nil, p.GRPC != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("exactly one of httpGet, tcpSocket and grpc must be set")
	}
	if port := p.Port(); port < 1 || port > 65535 {
		return fmt.Errorf("port %d is not between 1 and 65535", port)
	}
	if h := p.HTTPGet; h != nil {
		if h.Path != "" && h.Path[0] != '/' {
			return fmt.Errorf("path %q does not start with /", h.Path)
		}
		for _, c := range h.Path {
			if c < 0x21 || c > 0x7e {
				return fmt.Errorf("path %q has a character that is not printable ASCII", h.Path)
			}
		}
		if h.Scheme != "" && h.Scheme != corev1.URISchemeHTTP && h.Scheme != corev1.URISchemeHTTPS {
			return fmt.Errorf("scheme %q is neither HTTP nor HTTPS", h.Scheme)
		}
	}
	if g := p.GRPC; g != nil {
		for _, c := range g.Service {
			if c < 0x21 || c > 0x7e {
				return fmt.Errorf("grpc service %q has a character that is not printable ASCII", g.Service)
			}
		}
	}
	return nil
}

// parseProbes reads the probes annotation of an injected pod. What it cannot
// use is reported on the pod and left out; the kubelet then gets a 404 for
// that path, which fails the probe visibly rather than passing it.
func parseProbes(p *corev1.Pod) (map[string]AppProbe, []Problem) {
	v, ok := p.Annotations[AnnotationProbes]
	if !ok {
		return nil, nil
	}
	problem := func(msg string) Problem {
		return Problem{
			Object: Ref{Kind: "Pod", Namespace: p.Namespace, Name: p.Name}, Field: "metadata.annotations[" + AnnotationProbes + "]",
			Reason: "InvalidProbe", Message: msg, Condition: "Accepted",
		}
	}
	var raw map[string]AppProbe
	if err := json.Unmarshal([]byte(v), &raw); err != nil {
		return nil, []Problem{problem("not a JSON object of probes: " + err.Error())}
	}
	out := map[string]AppProbe{}
	var problems []Problem
	paths := make([]string, 0, len(raw))
	for path := range raw {
		paths = append(paths, path)
	}
	slices.Sort(paths)
	for _, path := range paths {
		if !probePath.MatchString(path) {
			problems = append(problems, problem(fmt.Sprintf("%q is not /app-health/<container>/<livez|readyz|startupz>", path)))
			continue
		}
		if err := raw[path].validate(); err != nil {
			problems = append(problems, problem(path+": "+err.Error()))
			continue
		}
		out[path] = raw[path]
	}
	return out, problems
}
