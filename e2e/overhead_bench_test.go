package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/pkg/inject"
)

// BenchmarkDataPlaneOverhead measures what two Envoy sidecars (client and
// server, Strict mTLS, iptables capture) add to a request: the same client
// sends 1 KB POSTs at a fixed rate over keep-alive connections to the same
// server app, once directly between unmeshed pods and once through the
// mesh, and the added p50/p90/p99 latency is reported, with the two
// sidecars' CPU and RSS. A benchmark, not a test: it reports, it does not
// pass or fail on time. Run it alone:
//
//	make e2e E2E_RUN=X E2E_BENCH=DataPlaneOverhead
func BenchmarkDataPlaneOverhead(b *testing.B) {
	if env == nil {
		b.Skip(skipWhy)
	}
	const rate, seconds = 1000, 10
	body := strings.Repeat("x", 1024)
	plain := benchNamespace(b, "bench-plain", false)
	meshed := benchNamespace(b, "bench-mesh", true)
	for range b.N {
		direct := benchRun(b, plain, "http://"+benchPodIP(b, plain, "server")+":8080/", body, rate, seconds)
		before := sidecarUsage(b, meshed)
		mesh := benchRun(b, meshed, "http://server/", body, rate, seconds)
		after := sidecarUsage(b, meshed)
		for _, q := range []float64{0.5, 0.9, 0.99} {
			d, m := pct(direct, q), pct(mesh, q)
			b.ReportMetric(m-d, fmt.Sprintf("added-p%.0f-ms", q*100))
			b.Logf("p%.0f: direct %.3f ms, through two sidecars %.3f ms (+%.3f ms)", q*100, d, m, m-d)
		}
		cpu := (after.cpuSeconds - before.cpuSeconds) / seconds
		b.ReportMetric(cpu*1000, "sidecars-cpu-ms/s")
		b.ReportMetric(after.rssMiB, "sidecars-rss-MiB")
		b.Logf("%d req/s, 1 KB POST, keep-alive: %d direct and %d meshed requests; both sidecars together used %.0f ms CPU per second (%.1f %% of a core) and %.1f MiB RSS",
			rate, len(direct), len(mesh), cpu*1000, cpu*100, after.rssMiB)
	}
}

func benchNamespace(b *testing.B, name string, meshed bool) string {
	labels := map[string]string{}
	if meshed {
		labels["trellis.dev/inject"] = "enabled"
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	server := httpClientPod(name, "server", "default", true)
	server.Labels["app"] = "server"
	c := env.Cluster.Client()
	for _, o := range []client.Object{ns, httpService(name, "server"), server, httpClientPod(name, "client", "default", true)} {
		if err := c.Create(b.Context(), o); err != nil {
			b.Fatal(err)
		}
	}
	// b.Context is over when cleanups run.
	b.Cleanup(func() { _ = c.Delete(context.Background(), ns) })
	// Ready: the app runs and, when meshed, its sidecar has its configuration.
	deadline := time.Now().Add(2 * time.Minute)
	for _, pod := range []string{"server", "client"} {
		for {
			var p corev1.Pod
			if err := c.Get(b.Context(), clientKey(name, pod), &p); err == nil && podReady(&p) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("pod %s/%s not ready after 2 minutes", name, pod)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return name
}

func benchPodIP(b *testing.B, ns, pod string) string {
	var p corev1.Pod
	if err := env.Cluster.Client().Get(b.Context(), clientKey(ns, pod), &p); err != nil {
		b.Fatal(err)
	}
	return p.Status.PodIP
}

// benchRun sends POSTs at rate for seconds and returns the latencies (ms)
// of the successful ones; it fails on any error.
func benchRun(b *testing.B, ns, url, body string, rate, seconds int) []float64 {
	cmd, err := env.Kubelet.Exec(b.Context(), ns, "client", "app", "client", "--url", url, "--method", "POST", "--body", body,
		"--qps", strconv.Itoa(rate), "--duration", fmt.Sprintf("%ds", seconds), "--concurrency", "16", "--timeout", "5s")
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.Output()
	if err != nil {
		b.Fatal(err)
	}
	var ms []float64
	bad := 0
	for _, l := range strings.Split(string(out), "\n") {
		i := strings.Index(l, `"ms":`)
		if i < 0 {
			continue
		}
		if !strings.Contains(l, `"code":200`) {
			bad++
			continue
		}
		v, _ := strconv.ParseFloat(strings.SplitN(l[i+5:], ",", 2)[0], 64)
		ms = append(ms, v)
	}
	if bad > 0 || len(ms) < rate*seconds*9/10 {
		b.Fatalf("%s: %d ok, %d failed", url, len(ms), bad)
	}
	slices.Sort(ms)
	return ms
}

func pct(sorted []float64, q float64) float64 {
	return sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]
}

type usage struct{ cpuSeconds, rssMiB float64 }

// sidecarUsage sums the CPU time and RSS of the namespace's two sidecars.
func sidecarUsage(b *testing.B, ns string) usage {
	var u usage
	for _, pod := range []string{"client", "server"} {
		pid := env.Kubelet.PID(ns, pod, inject.ProxyContainer)
		if pid == 0 {
			b.Fatalf("%s/%s: no sidecar process", ns, pod)
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			b.Fatal(err)
		}
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		u.cpuSeconds += (ut + st) / 100 // USER_HZ
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
				u.rssMiB += kb / 1024
			}
		}
	}
	return u
}

func clientKey(ns, name string) client.ObjectKey { return client.ObjectKey{Namespace: ns, Name: name} }
