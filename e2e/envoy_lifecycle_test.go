package e2e_test

import (
	"fmt"
	"strings"
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

// TestEnvoyLifecycle: native-sidecar ordering and probes through the
// sidecar under Strict mTLS.
func TestEnvoyLifecycle(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "web", 3)

	t.Run("a run-to-completion pod's app starts after Envoy is ready and its end ends the pod", func(t *testing.T) {
		// The app's first and only action is a call through the sidecar: it
		// fails if the app starts before Envoy has its configuration.
		job := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "once"},
			Spec: corev1.PodSpec{
				ServiceAccountName: "client", RestartPolicy: corev1.RestartPolicyNever,
				Containers: []corev1.Container{{
					Name: "app", Image: framework.HTTPEchoImage, Command: []string{"httpecho"},
					Args: []string{"client", "--url", "http://web/first-call", "--count", "1", "--timeout", "3s"},
				}},
			},
		}
		create(t, job)
		var p corev1.Pod
		eventually(t, "pod Succeeded", func() (bool, string) {
			if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKeyFromObject(job), &p); err != nil {
				return false, err.Error()
			}
			return p.Status.Phase == corev1.PodSucceeded, string(p.Status.Phase)
		})
		log := readFile(env.Kubelet.PodDir(ns, "once") + "/app.log")
		t.Logf("pod %s; app output %s", p.Status.Phase, strings.TrimSpace(log))
		if !strings.Contains(log, `"code":200`) {
			t.Errorf("the app's first call did not succeed: %s", log)
		}
		proxy := readFile(env.Kubelet.PodDir(ns, "once") + "/trellis-proxy.log")
		if !strings.Contains(proxy, "caught ENVOY_SIGTERM") && !strings.Contains(proxy, "exiting") {
			t.Errorf("Envoy did not exit after the app: %s", proxy[max(0, len(proxy)-500):])
		}
	})

	t.Run("a failing liveness probe restarts the app; TCP readiness through the sidecar", func(t *testing.T) {
		d := httpDeployment(ns, "sick", "v1", 1, "--unhealthy-after=4s")
		c := &d.Spec.Template.Spec.Containers[0]
		c.LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(httpPort)}}, PeriodSeconds: 1, FailureThreshold: 2}
		c.ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(tcpPort)}}, PeriodSeconds: 1}
		create(t, serviceAccount(ns, "sick"), httpService(ns, "sick"), d)
		waitEndpoints(t, ns, "sick", 1)
		var pods corev1.PodList
		if err := env.Cluster.Client().List(ctxT(t), &pods, client.InNamespace(ns), client.MatchingLabels{"app": "sick"}); err != nil || len(pods.Items) != 1 {
			t.Fatalf("sick pods: %v", err)
		}
		pod := pods.Items[0]
		if pod.Spec.Containers[0].LivenessProbe.HTTPGet.Port.IntValue() != 15020 {
			t.Fatalf("the injector did not move the liveness probe to 15020: %+v", pod.Spec.Containers[0].LivenessProbe)
		}
		eventually(t, "app restarted", func() (bool, string) {
			n := env.Kubelet.Restarts(ns, pod.Name, "app")
			return n >= 1, fmt.Sprintf("%d restarts", n)
		})
		// The pod's status says so, as kubectl get pods would show it
		// (RESTARTS), and the sidecar is a started, ready init container.
		eventually(t, "restart in the pod's status", func() (bool, string) {
			var p corev1.Pod
			if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKeyFromObject(&pod), &p); err != nil {
				return false, err.Error()
			}
			var app, proxy *corev1.ContainerStatus
			for i := range p.Status.ContainerStatuses {
				if p.Status.ContainerStatuses[i].Name == "app" {
					app = &p.Status.ContainerStatuses[i]
				}
			}
			for i := range p.Status.InitContainerStatuses {
				if p.Status.InitContainerStatuses[i].Name == "trellis-proxy" {
					proxy = &p.Status.InitContainerStatuses[i]
				}
			}
			return app != nil && app.RestartCount >= 1 && proxy != nil && proxy.Ready && proxy.State.Running != nil,
				fmt.Sprintf("app %+v, trellis-proxy %+v", app, proxy)
		})
		t.Logf("liveness %s%s failed through the sidecar; the app was restarted %d times",
			pod.Spec.Containers[0].LivenessProbe.HTTPGet.Path, "", env.Kubelet.Restarts(ns, pod.Name, "app"))
	})

	t.Run("scaling down under traffic loses no request", func(t *testing.T) {
		tr := startHTTPTraffic(t, ns, "client", 10*time.Second, "--url", "http://web/", "--qps", "50", "--concurrency", "4", "--timeout", "5s")
		time.Sleep(2 * time.Second)
		var d appsv1.Deployment
		if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: "web-v1"}, &d); err != nil {
			t.Fatal(err)
		}
		d.Spec.Replicas = ptr.To[int32](1)
		update(t, &d)
		waitEndpoints(t, ns, "web", 1)
		rs := tr.stop(t)
		c := codes(rs)
		t.Logf("3 → 1 replicas under 50 req/s: %v over %d requests", c, len(rs))
		// A GET already sent on a keep-alive connection the terminating
		// app closes is marked retriable by the server's sidecar (a safe
		// method) and retried on another replica: nothing may fail.
		if c[200] != len(rs) || len(rs) < 100 {
			t.Errorf("%v (%s)", c, firstHTTPError(rs, 200))
			for _, r := range rs {
				if r.Code != 200 {
					t.Logf("request %d: %d %s %.0f ms", r.I, r.Code, r.Error+r.Raw, r.MS)
				}
			}
			t.Logf("raw traffic: %s", tr.raw())
			// What the client's sidecar did about it: retries (and their
			// overflow), connect timeouts, pending-queue failures.
			b, err := env.Kubelet.EnvoyAdmin(ctxT(t), ns, "client", "/stats?filter=outbound.*web.*(retry|cx_connect|pending|rq_5xx|membership)")
			t.Logf("client sidecar stats (%v):\n%s", err, b)
		}
	})
}
