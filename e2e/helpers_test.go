package e2e_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/trellis-mesh/trellis/e2e/framework"
)

var (
	env     *framework.Env
	skipWhy string
)

func TestMain(m *testing.M) {
	// The API server's warnings to the tests' client (e.g. a field the
	// installed CRDs prune) are printed instead of a missing-logger stack.
	ctrllog.SetLogger(funcr.New(func(prefix, args string) { fmt.Println("client:", prefix, args) }, funcr.Options{}))
	if err := framework.CheckPrivileges(); err != nil {
		skipWhy = "SKIP: e2e " + err.Error() + "; the suite runs as root with iproute2 (make test and make e2e in CI)"
		fmt.Println(skipWhy)
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "trellis-e2e")
	if err != nil {
		panic(err)
	}
	start := time.Now()
	env, err = framework.Start(context.Background(), framework.Options{Dir: dir, Logf: func(f string, a ...any) { fmt.Printf("kubelet: "+f+"\n", a...) }})
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e environment: %v (logs in %s)\n", err, dir)
		os.Exit(1)
	}
	fmt.Printf("e2e: environment up in %s (logs, pods: %s)\n", time.Since(start).Round(100*time.Millisecond), dir)
	code := m.Run()
	env.Stop()
	// The controller ran with the Helm chart's ServiceAccount: anything it
	// was refused is a gap in the chart's RBAC.
	for i := range framework.Replicas {
		b, err := os.ReadFile(env.ReplicaLog(i))
		if err != nil {
			continue
		}
		b = withoutBlindSpots(i, b)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "forbidden") {
				fmt.Printf("FAIL: the controller was refused something under the chart's RBAC: %s\n", l)
				code = 1
			}
		}
	}
	if code == 0 {
		_ = os.RemoveAll(dir)
	}
	os.Exit(code)
}

// blindSpots are the parts of the replicas' logs written while the
// apiserver restarted (TestFaultAPIServerDown): until its RBAC caches
// sync it refuses everyone, so "forbidden" there says nothing of the chart.
var (
	blindSpotsMu sync.Mutex
	blindSpots   []blindSpot
)

type blindSpot struct {
	replica  int
	from, to int64
}

func withoutBlindSpots(replica int, b []byte) []byte {
	blindSpotsMu.Lock()
	defer blindSpotsMu.Unlock()
	for _, s := range blindSpots {
		if s.replica == replica && s.from < int64(len(b)) {
			to := min(s.to, int64(len(b)))
			b = append(b[:s.from:s.from], append(make([]byte, to-s.from), b[to:]...)...)
		}
	}
	return b
}

// logSizes are the replicas' log sizes now.
func logSizes() [framework.Replicas]int64 {
	var out [framework.Replicas]int64
	for i := range out {
		if st, err := os.Stat(env.ReplicaLog(i)); err == nil {
			out[i] = st.Size()
		}
	}
	return out
}

func requireEnv(t *testing.T) {
	t.Helper()
	if env == nil {
		t.Skip(skipWhy)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// meshNamespace creates a namespace labelled for injection, deleted at the
// end of the test.
func meshNamespace(t *testing.T) string {
	t.Helper()
	name := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	if len(name) > 50 {
		name = name[:50]
	}
	// A second namespace of the same test gets a suffix.
	nsCountMu.Lock()
	nsCount[name]++
	if n := nsCount[name]; n > 1 {
		name = fmt.Sprintf("%s-%d", strings.TrimRight(name, "-"), n)
	}
	nsCountMu.Unlock()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: strings.TrimRight(name, "-"), Labels: map[string]string{"trellis.dev/inject": "enabled"}}}
	create(t, ns)
	t.Cleanup(func() {
		_ = env.Cluster.Client().Delete(context.Background(), ns)
	})
	return ns.Name
}

var (
	nsCountMu sync.Mutex
	nsCount   = map[string]int{}
)

func create(t *testing.T, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		if err := env.Cluster.Client().Create(ctxT(t), o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
}

// echoDeployment is a Deployment of proxyless echo servers on port 50051
// with labels app=<app>, version=<version>.
func echoDeployment(ns, app, version string, replicas int32, args ...string) *appsv1.Deployment {
	labels := map[string]string{"app": app, "version": version}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app + "-" + version},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Strategy: appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{"trellis.dev/proxy": "grpc"}},
				Spec: corev1.PodSpec{
					ServiceAccountName:            app,
					TerminationGracePeriodSeconds: ptr.To[int64](5),
					Containers: []corev1.Container{{
						Name: "echo", Image: framework.EchoImage, Command: []string{"echo"},
						Args:           append([]string{"server", "--address=0.0.0.0:50051", "--version=" + version}, args...),
						Ports:          []corev1.ContainerPort{{Name: "grpc", ContainerPort: 50051}},
						ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(50051)}}},
					}},
				},
			},
		},
	}
}

func echoService(ns, app string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": app},
			Ports:    []corev1.ServicePort{{Name: "grpc", Port: 50051, TargetPort: intstr.FromInt32(50051)}},
		},
	}
}

func serviceAccount(ns, name string) *corev1.ServiceAccount {
	return &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
}

// clientPod is a proxyless pod whose main process idles; calls are made by
// exec'ing the echo client in it.
func clientPod(ns, name, sa string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: map[string]string{"trellis.dev/proxy": "grpc"}},
		Spec: corev1.PodSpec{
			ServiceAccountName:            sa,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			Containers:                    []corev1.Container{{Name: "client", Image: framework.EchoImage, Command: []string{"echo"}, Args: []string{"idle"}}},
		},
	}
}

// waitEndpoints waits until the Service has exactly n ready endpoints.
func waitEndpoints(t *testing.T, ns, svc string, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	got := -1
	for time.Now().Before(deadline) {
		if got = readyEndpoints(t, ns, svc); got == n {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("service %s/%s has %d ready endpoints, want %d", ns, svc, got, n)
}

// readyEndpoints counts a Service's ready endpoints now.
func readyEndpoints(t *testing.T, ns, svc string) int {
	t.Helper()
	var slices discoveryv1.EndpointSliceList
	if err := env.Cluster.Client().List(ctxT(t), &slices, client.InNamespace(ns), client.MatchingLabels{"kubernetes.io/service-name": svc}); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range slices.Items {
		for _, e := range s.Endpoints {
			if ptr.Deref(e.Conditions.Ready, false) {
				n++
			}
		}
	}
	return n
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// waitRunning waits until the kubelet runs the pod.
func waitRunning(t *testing.T, ns, pod string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		var p corev1.Pod
		if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: pod}, &p); err == nil && podReady(&p) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("pod %s/%s did not become ready; its logs: %s", ns, pod, env.Kubelet.PodDir(ns, pod))
}

// result is one call's outcome as the echo client prints it.
type result struct {
	Pod      string            `json:"pod"`
	Version  string            `json:"version"`
	SPIFFEID string            `json:"spiffeID"`
	Headers  map[string]string `json:"headers"`
	Error    string            `json:"error"`
	Code     string            `json:"code"`
	MS       float64           `json:"ms"`
	At       int64             `json:"at"`
}

func (r result) ok() bool { return r.Error == "" }

// call runs the echo client in a pod and returns every call's result.
func call(t *testing.T, ns, pod string, args ...string) []result {
	t.Helper()
	return parse(t, execClient(t, ns, pod, "client", args...))
}

// execClient runs `<binary> client args...` in a pod's container (kubectl
// exec) and returns its output; it fails the test if the client fails.
func execClient(t *testing.T, ns, pod, container string, args ...string) []byte {
	t.Helper()
	cmd, err := env.Kubelet.Exec(ctxT(t), ns, pod, container, append([]string{"client"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client %s in %s/%s: %v\n%s", strings.Join(args, " "), ns, pod, err, stderr.String())
	}
	return out
}

func parse(t *testing.T, out []byte) []result {
	t.Helper()
	return jsonLines[result](t, out)
}

// jsonLines decodes a client's output, one JSON object a line.
func jsonLines[T any](t *testing.T, out []byte) []T {
	t.Helper()
	var rs []T
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r T
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("client output %q: %v", sc.Text(), err)
		}
		rs = append(rs, r)
	}
	return rs
}

func target(ns, svc string) string {
	return fmt.Sprintf("--target=xds:///%s.%s.svc.cluster.local:50051", svc, ns)
}

func summarize(rs []result) (ok int, codes map[string]int, by map[string]int) {
	codes, by = map[string]int{}, map[string]int{}
	for _, r := range rs {
		if r.ok() {
			ok++
			by[r.Version]++
		} else {
			codes[r.Code]++
		}
	}
	return ok, codes, by
}

func firstError(rs []result) string {
	for _, r := range rs {
		if !r.ok() {
			return r.Code + ": " + r.Error
		}
	}
	return ""
}

// podLogs is for failure messages.
func podLogs(ns, pod string) string {
	dir := env.Kubelet.PodDir(ns, pod)
	var b strings.Builder
	files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, f := range files {
		data, _ := os.ReadFile(f)
		fmt.Fprintf(&b, "--- %s\n%s\n", f, data)
	}
	return b.String()
}

// podIP is the IP of the first ready pod whose name starts with prefix.
func podIP(t *testing.T, ns, prefix string) string {
	t.Helper()
	var pods corev1.PodList
	if err := env.Cluster.Client().List(ctxT(t), &pods, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if strings.HasPrefix(p.Name, prefix) && p.Status.PodIP != "" {
			return p.Status.PodIP
		}
	}
	t.Fatalf("no pod %s* with an IP", prefix)
	return ""
}

// update writes obj's spec, retrying on conflicts with the controller's
// status writes.
func update[T client.Object](t *testing.T, obj T) {
	t.Helper()
	for range 10 {
		fresh := obj.DeepCopyObject().(T)
		if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKeyFromObject(obj), fresh); err != nil {
			t.Fatal(err)
		}
		obj.SetResourceVersion(fresh.GetResourceVersion())
		err := env.Cluster.Client().Update(ctxT(t), obj)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			t.Fatal(err)
		}
	}
	t.Fatalf("update %s: too many conflicts", obj.GetName())
}

// podDirs are the directories of the running pods whose name starts with prefix.
func podDirs(ns, prefix string) []string {
	var pods corev1.PodList
	if err := env.Cluster.Client().List(context.Background(), &pods, client.InNamespace(ns)); err != nil {
		return nil
	}
	var out []string
	for _, p := range pods.Items {
		if strings.HasPrefix(p.Name, prefix) {
			if d := env.Kubelet.PodDir(ns, p.Name); d != "" {
				out = append(out, d)
			}
		}
	}
	return out
}
