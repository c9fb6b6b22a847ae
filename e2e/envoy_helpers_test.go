package e2e_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/e2e/framework"
)

// The Envoy-sidecar scenarios run e2e/apps/httpecho, a plain HTTP/TCP app
// that knows nothing of the mesh, with the injected stock Envoy sidecar and
// trellis-init's iptables capture. Calls come from `httpecho client` exec'd
// in a client pod (as kubectl exec would), dialling Service names and
// cluster IPs as any application does.

const (
	httpPort = 8080
	tcpPort  = 9000
)

// httpDeployment is a Deployment of httpecho servers (HTTP on 8080, TCP
// echo on 9000) with labels app=<app>, version=<version>; Envoy sidecars
// are injected (the namespace is labelled).
func httpDeployment(ns, app, version string, replicas int32, args ...string) *appsv1.Deployment {
	labels := map[string]string{"app": app, "version": version}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app + "-" + version},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					ServiceAccountName:            app,
					TerminationGracePeriodSeconds: ptr.To[int64](5),
					Containers: []corev1.Container{{
						Name: "app", Image: framework.HTTPEchoImage, Command: []string{"httpecho"},
						Args: append([]string{"serve", fmt.Sprintf("--http-port=%d", httpPort), fmt.Sprintf("--tcp-port=%d", tcpPort), "--version=" + version}, args...),
						Env:  []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
						Ports: []corev1.ContainerPort{
							{Name: "http", ContainerPort: httpPort}, {Name: "tcp", ContainerPort: tcpPort},
						},
						ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(httpPort)}}, PeriodSeconds: 1},
					}},
				},
			},
		},
	}
}

// httpService selects app with an HTTP port 80 → 8080 and a TCP port 9000.
func httpService(ns, app string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(httpPort), AppProtocol: ptr.To("http")},
				{Name: "tcp", Port: tcpPort, TargetPort: intstr.FromInt32(tcpPort), AppProtocol: ptr.To("tcp")},
			},
		},
	}
}

// httpClientPod is a pod whose app is an idle httpecho server; calls are
// made by exec'ing `httpecho client` in it. Sidecar injected unless the
// pod opts out (inject=false).
func httpClientPod(ns, name, sa string, inject bool) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			ServiceAccountName:            sa,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers: []corev1.Container{{
				Name: "app", Image: framework.HTTPEchoImage, Command: []string{"httpecho"},
				Args: []string{"serve", "--http-port=8080"},
				Env:  []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
			}},
		},
	}
	if !inject {
		p.Labels["trellis.dev/inject"] = "disabled"
	}
	return p
}

// httpResult is one request's outcome as `httpecho client` prints it.
type httpResult struct {
	I           int               `json:"i"`
	Code        int               `json:"code"`
	Error       string            `json:"error"`
	MS          float64           `json:"ms"`
	Pod         string            `json:"pod"`
	Version     string            `json:"version"`
	Body        *echoBody         `json:"body"`
	Raw         string            `json:"raw"`
	RespHeaders map[string]string `json:"resp_headers"`
	Hello       string            `json:"hello"`
	Echo        string            `json:"echo"`
	Reply       string            `json:"reply"`
}

// echoBody is what httpecho answers.
type echoBody struct {
	Pod     string              `json:"pod"`
	Version string              `json:"version"`
	Method  string              `json:"method"`
	Host    string              `json:"host"`
	Path    string              `json:"path"`
	Query   string              `json:"query"`
	Proto   string              `json:"proto"`
	Remote  string              `json:"remote"`
	Headers map[string][]string `json:"headers"`
	// Count is the server's echo request number (--fail-every counts it).
	Count int64 `json:"count"`
}

func (b *echoBody) header(name string) string {
	if b == nil || len(b.Headers[name]) == 0 {
		return ""
	}
	return b.Headers[name][0]
}

// httpCall runs `httpecho client args...` in the pod's app container.
func httpCall(t *testing.T, ns, pod string, args ...string) []httpResult {
	t.Helper()
	return jsonLines[httpResult](t, execClient(t, ns, pod, "app", args...))
}

// codes counts results by status code (0: transport error).
func codes(rs []httpResult) map[int]int {
	out := map[int]int{}
	for _, r := range rs {
		out[r.Code]++
	}
	return out
}

func firstHTTPError(rs []httpResult, want int) string {
	for _, r := range rs {
		if r.Code != want {
			return fmt.Sprintf("code %d %s %s", r.Code, r.Error, r.Raw)
		}
	}
	return ""
}

// eventuallyHTTP repeats a call until check accepts its results (config
// reaches the sidecars asynchronously) and returns the accepted results.
func eventuallyHTTP(t *testing.T, what string, call func() []httpResult, check func([]httpResult) (bool, string)) []httpResult {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var last string
	for {
		rs := call()
		ok, why := check(rs)
		if ok {
			return rs
		}
		last = why
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s after 90 s", what, last)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func allCode(want int) func([]httpResult) (bool, string) {
	return func(rs []httpResult) (bool, string) {
		c := codes(rs)
		return len(rs) > 0 && c[want] == len(rs), fmt.Sprintf("codes %v (%s)", c, firstHTTPError(rs, want))
	}
}

// setupHTTP creates a namespace with httpecho app (Deployment + Service,
// sidecars injected) and a meshed client pod; it waits for both.
func setupHTTP(t *testing.T, app string, replicas int32, args ...string) string {
	t.Helper()
	ns := meshNamespace(t)
	create(t, serviceAccount(ns, app), serviceAccount(ns, "client"),
		httpDeployment(ns, app, "v1", replicas, args...), httpService(ns, app), httpClientPod(ns, "client", "client", true))
	waitEndpoints(t, ns, app, int(replicas))
	waitRunning(t, ns, "client")
	return ns
}

func clusterIP(t *testing.T, ns, svc string) string {
	t.Helper()
	var s corev1.Service
	if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: svc}, &s); err != nil {
		t.Fatal(err)
	}
	return s.Spec.ClusterIP
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// httpTraffic is `httpecho client` running in the background.
type httpTraffic struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
}

func (h *httpTraffic) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.out.Write(p)
}

// startHTTPTraffic runs the client with args (add --qps and so on) for d;
// stop waits for it to finish, so that a request still hanging at the end
// is counted (as its timeout), not cut off.
func startHTTPTraffic(t *testing.T, ns, pod string, d time.Duration, args ...string) *httpTraffic {
	t.Helper()
	cmd, err := env.Kubelet.Exec(ctxT(t), ns, pod, "app", append([]string{"client", "--duration=" + d.String()}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	h := &httpTraffic{cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = h, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(h.done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return h
}

// stop waits for the traffic to end and returns every result.
func (h *httpTraffic) stop(t *testing.T) []httpResult {
	t.Helper()
	select {
	case <-h.done:
	case <-time.After(5 * time.Minute):
		_ = h.cmd.Process.Signal(syscall.SIGTERM)
		t.Errorf("the traffic client did not finish; stopped it")
		<-h.done
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var rs []httpResult
	sc := bufio.NewScanner(bytes.NewReader(h.out.Bytes()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r httpResult
		if json.Unmarshal(sc.Bytes(), &r) == nil {
			rs = append(rs, r)
		}
	}
	return rs
}

func (h *httpTraffic) raw() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	for _, l := range strings.Split(h.out.String(), "\n") {
		if !strings.Contains(l, `"code":200`) {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// podNames are the names of the pods whose name starts with prefix.
func podNames(t *testing.T, ns, prefix string) []string {
	t.Helper()
	var pods corev1.PodList
	if err := env.Cluster.Client().List(ctxT(t), &pods, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range pods.Items {
		if strings.HasPrefix(p.Name, prefix) && p.DeletionTimestamp == nil {
			out = append(out, p.Name)
		}
	}
	return out
}

// serialNumbers are the certificate serial numbers in an Envoy /certs answer.
// certSerials lists the serial numbers (lower-case hex) of a sidecar's
// certificate chains and of its trusted CAs from the admin /certs page.
func certSerials(certs string) (chain, cas string) {
	type cert struct {
		SerialNumber string `json:"serial_number"`
	}
	var d struct {
		Certificates []struct {
			CACert    []cert `json:"ca_cert"`
			CertChain []cert `json:"cert_chain"`
		} `json:"certificates"`
	}
	if json.Unmarshal([]byte(certs), &d) != nil {
		return "", ""
	}
	join := func(pick func(int) []cert) string {
		var out []string
		for i := range d.Certificates {
			for _, x := range pick(i) {
				if sn := strings.TrimLeft(strings.ToLower(x.SerialNumber), "0"); !slices.Contains(out, sn) {
					out = append(out, sn)
				}
			}
		}
		slices.Sort(out)
		return strings.Join(out, ",")
	}
	return join(func(i int) []cert { return d.Certificates[i].CertChain }), join(func(i int) []cert { return d.Certificates[i].CACert })
}
