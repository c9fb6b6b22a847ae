package inject

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// Names and paths of what is injected.
const (
	ProxyContainer = "trellis-proxy"
	InitContainer  = "trellis-init"
	TokenVolume    = "trellis-token"
	RootCAVolume   = "trellis-root-ca"
	TokenDir       = "/var/run/secrets/trellis"
	TokenPath      = TokenDir + "/token"
	RootCADir      = "/etc/trellis/root-ca"
	RootCAPath     = RootCADir + "/root-cert.pem"
	// CertsDir is where proxyless gRPC workloads find their certificate
	// files, written by cert-manager's csi-driver-spiffe.
	CertsDir     = "/var/run/secrets/spiffe.io"
	CertsVolume  = "trellis-spiffe"
	ProxyUID     = 1337
	TokenSeconds = 3600

	LabelInject        = "trellis.dev/inject"
	AnnotationStatus   = "trellis.dev/status"
	AnnotationProxy    = model.AnnotationProxy
	AnnotationCPU      = "trellis.dev/proxy-cpu"
	AnnotationMemory   = "trellis.dev/proxy-memory"
	AnnotationLogLevel = "trellis.dev/log-level"
	AnnotationExclIn   = model.AnnotationExcludeInboundPorts
	AnnotationExclOut  = "trellis.dev/exclude-outbound-ports"
	AnnotationExclCIDR = "trellis.dev/exclude-outbound-cidrs"
	// AnnotationDrainSeconds sets how long the proxy keeps serving after
	// the application has exited (its preStop sleep), 0 to 300 seconds;
	// default DrainSeconds.
	AnnotationDrainSeconds = "trellis.dev/proxy-drain-seconds"
	// DrainSeconds is the proxy's default drain: long enough for the EDS
	// removal of a terminating pod to reach every client (well under a
	// second when the control plane is healthy), short enough not to hold
	// a Job's completion long.
	DrainSeconds = 5
	// AnnotationNativeSidecar "false" injects the proxy as a regular
	// container for clusters without native sidecars (Kubernetes < 1.29).
	AnnotationNativeSidecar = "trellis.dev/native-sidecar"
)

// waitForProxy is the fallback's postStart hook: the kubelet starts the
// application containers only after it returns, i.e. once Envoy's
// readiness listener (delivered over xDS) answers 200. Bash's /dev/tcp is
// used because the stock Envoy image has no HTTP client.
const waitForProxy = `for i in $(seq 1 600); do if exec 3<>/dev/tcp/127.0.0.1/15021; then printf 'GET /ready HTTP/1.0\r\n\r\n' >&3; read -r line <&3; exec 3>&-; case "$line" in *" 200 "*) exit 0;; esac; fi; sleep 0.2; done; exit 1`

var known = []string{AnnotationStatus, model.AnnotationProbes, AnnotationRewriteProbes, AnnotationProxy, AnnotationCPU, AnnotationMemory, AnnotationLogLevel, AnnotationDrainSeconds, AnnotationExclIn, AnnotationExclOut, AnnotationExclCIDR, AnnotationNativeSidecar}

// Config is what injection needs besides the pod.
type Config struct {
	Mesh meshv1alpha1.MeshConfigSpec
	// InitImage is the trellis-init image.
	InitImage string
	// XDSHost and XDSPort address the control plane, e.g.
	// trellis-xds.trellis-system.svc and 15012.
	XDSHost string
	XDSPort int
}

// Pod returns a copy of pod with the data plane added, and admission
// warnings. It changes nothing for host-network pods, pods labelled
// trellis.dev/inject=disabled and pods already injected, so it is
// idempotent. Values it cannot use are warned about and ignored.
func Pod(pod *corev1.Pod, cfg Config) (*corev1.Pod, []string) {
	p := pod.DeepCopy()
	var warnings []string
	for k := range p.Annotations {
		if strings.HasPrefix(k, "trellis.dev/") && !slices.Contains(known, k) {
			warnings = append(warnings, fmt.Sprintf("unknown annotation %s is ignored", k))
		}
	}
	slices.Sort(warnings)
	if p.Spec.HostNetwork || p.Labels[LabelInject] == "disabled" || p.Annotations[AnnotationStatus] == "injected" {
		return p, warnings
	}
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	mc := model.Defaults(cfg.Mesh)
	if p.Annotations[AnnotationProxy] == string(model.ProxyGRPC) {
		injectGRPC(p, cfg)
	} else {
		ws, injected := injectEnvoy(p, cfg, mc)
		warnings = append(warnings, ws...)
		// The probes annotation is ours to write: one from the user is dropped.
		delete(p.Annotations, model.AnnotationProbes)
		v := p.Annotations[AnnotationRewriteProbes]
		if v != "" && v != "true" && v != "false" {
			warnings = append(warnings, fmt.Sprintf("%s=%q is neither true nor false; probes are rewritten", AnnotationRewriteProbes, v))
		}
		if v != "false" && injected {
			warnings = append(warnings, rewriteProbes(p)...)
		}
		p.Annotations[AnnotationProxy] = string(model.ProxySidecar)
		p.Annotations["prometheus.io/scrape"] = "true"
		p.Annotations["prometheus.io/port"] = "15020"
		p.Annotations["prometheus.io/path"] = "/stats/prometheus"
	}
	p.Annotations[AnnotationStatus] = "injected"
	return p, warnings
}

func volumes(p *corev1.Pod) {
	// The projected token needs a named ServiceAccount (the apiserver
	// rejects the pod otherwise). The ServiceAccount admission plugin names
	// "default" before webhooks run; where it is off, the injector does.
	if p.Spec.ServiceAccountName == "" {
		p.Spec.ServiceAccountName = "default"
	}
	p.Spec.Volumes = append(p.Spec.Volumes,
		corev1.Volume{Name: TokenVolume, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: "trellis", ExpirationSeconds: ptr.To[int64](TokenSeconds), Path: "token",
			}}},
		}}},
		corev1.Volume{Name: RootCAVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "trellis-root-ca"},
		}}},
	)
}

func mounts() []corev1.VolumeMount {
	return []corev1.VolumeMount{
		{Name: TokenVolume, MountPath: TokenDir, ReadOnly: true},
		{Name: RootCAVolume, MountPath: RootCADir, ReadOnly: true},
	}
}

// downward are the pod facts the bootstrap's $(VAR) references use.
func downward() []corev1.EnvVar {
	field := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	return []corev1.EnvVar{
		field("POD_NAME", "metadata.name"),
		field("POD_NAMESPACE", "metadata.namespace"),
		field("POD_IP", "status.podIP"),
		field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
	}
}

// injectEnvoy adds trellis-init and the proxy; it reports whether it did.
func injectEnvoy(p *corev1.Pod, cfg Config, mc meshv1alpha1.MeshConfigSpec) ([]string, bool) {
	var warnings []string
	res := corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")}}
	if mc.Sidecar.Resources != nil {
		res = *mc.Sidecar.Resources.DeepCopy()
	}
	for ann, name := range map[string]corev1.ResourceName{AnnotationCPU: corev1.ResourceCPU, AnnotationMemory: corev1.ResourceMemory} {
		if v, ok := p.Annotations[ann]; ok {
			q, err := resource.ParseQuantity(v)
			if err != nil {
				warnings = append(warnings, fmt.Sprintf("%s=%q is not a quantity and is ignored", ann, v))
				continue
			}
			if res.Requests == nil {
				res.Requests = corev1.ResourceList{}
			}
			res.Requests[name] = q
		}
	}
	logLevel := string(mc.Sidecar.LogLevel)
	if v, ok := p.Annotations[AnnotationLogLevel]; ok {
		if slices.Contains([]string{"trace", "debug", "info", "warning", "error", "critical", "off"}, v) {
			logLevel = v
		} else {
			warnings = append(warnings, fmt.Sprintf("%s=%q is not an Envoy log level and is ignored", AnnotationLogLevel, v))
		}
	}
	drain := int64(DrainSeconds)
	if v, ok := p.Annotations[AnnotationDrainSeconds]; ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 && n <= 300 {
			drain = n
		} else {
			warnings = append(warnings, fmt.Sprintf("%s=%q is not a number of seconds from 0 to 300 and is ignored (the proxy drains for %d s)", AnnotationDrainSeconds, v, DrainSeconds))
		}
	}
	// The apiserver refuses a preStop sleep longer than the grace period.
	if g := ptr.Deref(p.Spec.TerminationGracePeriodSeconds, 30); drain > g {
		if _, asked := p.Annotations[AnnotationDrainSeconds]; asked {
			warnings = append(warnings, fmt.Sprintf("%s=%d is longer than terminationGracePeriodSeconds (%d); the proxy drains for %d s", AnnotationDrainSeconds, drain, g, max(g, 0)))
		}
		drain = max(g, 0)
	}
	initArgs := []string{}
	for _, a := range []struct{ ann, flag string }{{AnnotationExclIn, "--exclude-inbound-ports"}, {AnnotationExclOut, "--exclude-outbound-ports"}} {
		if v, ok := p.Annotations[a.ann]; ok {
			if ports, ok := portList(v); ok {
				initArgs = append(initArgs, a.flag+"="+ports)
			} else {
				warnings = append(warnings, fmt.Sprintf("%s=%q is not a list of ports and is ignored", a.ann, v))
			}
		}
	}
	if v, ok := p.Annotations[AnnotationExclCIDR]; ok {
		if cidrs, ok := cidrList(v); ok {
			initArgs = append(initArgs, "--exclude-outbound-cidrs="+cidrs)
		} else {
			warnings = append(warnings, fmt.Sprintf("%s=%q is not a list of CIDRs and is ignored", AnnotationExclCIDR, v))
		}
	}
	bootstrap, err := EnvoyBootstrap(cfg)
	if err != nil {
		// Our own bootstrap failing validation is a bug, not user input.
		warnings = append(warnings, "sidecar not injected: "+err.Error())
		return warnings, false
	}
	volumes(p)
	initC := corev1.Container{
		Name: InitContainer, Image: cfg.InitImage,
		Args: append([]string{"--proxy-uid=" + strconv.Itoa(ProxyUID), "--inbound-port=15006", "--outbound-port=15001"}, initArgs...),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser: ptr.To[int64](0), RunAsNonRoot: ptr.To(false), Privileged: ptr.To(false),
			AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
			Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"}, Drop: []corev1.Capability{"ALL"}},
		},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")}},
	}
	proxy := corev1.Container{
		Name: ProxyContainer, Image: mc.Sidecar.Image,
		// Native sidecar: starts before and stops after the application.
		// Two worker threads whatever the node's size (Istio's default): a
		// sidecar serves one pod, and Envoy's default of one per core would
		// grow its memory and connections with the node.
		RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
		Args:          []string{"--config-yaml", bootstrap, "--log-level", logLevel, "--drain-time-s", "5", "--concurrency", "2"},
		Env:           downward(),
		// Envoy exits at once on SIGTERM, cutting the requests in flight on
		// its connections; clients whose EDS removal of this pod has not
		// arrived yet would still send some. The sleep keeps it serving
		// after the application has exited (a native sidecar is stopped
		// after the application; its preStop runs first): what arrives
		// then is answered 503 with NotDeliveredHeader and retried on
		// another endpoint, and by the end no client sends here any more
		// (set below).
		Ports: []corev1.ContainerPort{
			{Name: "trellis-stats", ContainerPort: 15020, Protocol: corev1.ProtocolTCP},
			{Name: "trellis-ready", ContainerPort: 15021, Protocol: corev1.ProtocolTCP},
		},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(15021)}}, PeriodSeconds: 2, FailureThreshold: 30},
		StartupProbe:   &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(15021)}}, PeriodSeconds: 1, FailureThreshold: 600},
		Resources:      res,
		VolumeMounts:   mounts(),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser: ptr.To[int64](ProxyUID), RunAsGroup: ptr.To[int64](ProxyUID), RunAsNonRoot: ptr.To(true),
			AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true), Privileged: ptr.To(false),
			Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		},
	}
	if drain > 0 {
		proxy.Lifecycle = &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: drain}}}
	}
	// trellis-init first (it must run before anything opens a socket), then
	// the proxy, then the pod's own init containers, which already go
	// through the proxy.
	switch v := p.Annotations[AnnotationNativeSidecar]; v {
	case "false":
		// Fallback: a regular container, first, whose postStart hook holds
		// the application containers back until the proxy is ready. Jobs
		// do not complete with it (the proxy never exits on its own).
		proxy.RestartPolicy = nil
		if proxy.Lifecycle == nil {
			proxy.Lifecycle = &corev1.Lifecycle{}
		}
		proxy.Lifecycle.PostStart = &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"bash", "-c", waitForProxy}}}
		p.Spec.InitContainers = append([]corev1.Container{initC}, p.Spec.InitContainers...)
		p.Spec.Containers = append([]corev1.Container{proxy}, p.Spec.Containers...)
		return warnings, true
	case "", "true":
	default:
		warnings = append(warnings, fmt.Sprintf("%s=%q is neither true nor false; the proxy is a native sidecar", AnnotationNativeSidecar, v))
	}
	p.Spec.InitContainers = append([]corev1.Container{initC, proxy}, p.Spec.InitContainers...)
	return warnings, true
}

func injectGRPC(p *corev1.Pod, cfg Config) {
	volumes(p)
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: CertsVolume, VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver: "spiffe.csi.cert-manager.io", ReadOnly: ptr.To(true),
	}}})
	bootstrap := GRPCBootstrap(cfg)
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		c.Env = append(c.Env, downward()...)
		c.Env = append(c.Env,
			corev1.EnvVar{Name: "GRPC_XDS_BOOTSTRAP_CONFIG", Value: bootstrap},
			corev1.EnvVar{Name: "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS", Value: "true"},
		)
		c.VolumeMounts = append(c.VolumeMounts, mounts()...)
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: CertsVolume, MountPath: CertsDir, ReadOnly: true})
	}
}

// GRPCBootstrap is the gRPC xDS bootstrap of a proxyless workload. gRPC
// expands no variables, so the node id is completed by the application's
// environment: $(POD_IP) and friends are expanded by Kubernetes in env
// values that reference earlier env vars.
func GRPCBootstrap(cfg Config) string {
	b := map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      fmt.Sprintf("%s:%d", cfg.XDSHost, cfg.XDSPort),
			"channel_creds":   []any{map[string]any{"type": "tls", "config": map[string]any{"ca_certificate_file": RootCAPath}}},
			"call_creds":      []any{map[string]any{"type": "jwt_token_file", "config": map[string]any{"jwt_token_file": TokenPath}}},
			"server_features": []string{"xds_v3"},
		}},
		// grpc-js refuses a node without a locality; the zone is not known here
		// (the pod's node is not chosen yet), so it is empty.
		"node": map[string]any{"id": "grpc~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.cluster.local", "locality": map[string]any{}},
		"certificate_providers": map[string]any{"default": map[string]any{"plugin_name": "file_watcher", "config": map[string]any{
			"certificate_file": CertsDir + "/tls.crt", "private_key_file": CertsDir + "/tls.key", "ca_certificate_file": CertsDir + "/ca.crt", "refresh_interval": "10s",
		}}},
		"server_listener_resource_name_template": "grpc/server?xds.resource.listening_address=%s",
	}
	out, _ := json.Marshal(b)
	return string(out)
}

func portList(v string) (string, bool) {
	var out []string
	for _, s := range strings.Split(v, ",") {
		s = strings.TrimSpace(s)
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 65535 {
			return "", false
		}
		out = append(out, strconv.Itoa(n))
	}
	return strings.Join(out, ","), len(out) > 0
}

func cidrList(v string) (string, bool) {
	var out []string
	for _, s := range strings.Split(v, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return "", false
		}
		out = append(out, p.Masked().String())
	}
	return strings.Join(out, ","), len(out) > 0
}
