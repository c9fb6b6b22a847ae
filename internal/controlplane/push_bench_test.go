package controlplane_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/testgen"
)

// The push benchmark runs its simulated proxies (hack/xdsload, built from
// internal/xdsclient) in a separate process, so this process's memory is the
// controller's: informers, model, cache, streams and connections.

var loadBuild = &buildOnce{pkg: "./hack/xdsload"}

func xdsloadBinary(t testing.TB) string { return loadBuild.get(t) }

type pushLoad struct {
	p       *plane
	slice   *discoveryv1.EndpointSlice
	in      io.WriteCloser
	out     *bufio.Scanner
	proxies int
}

// setupPushServices starts a control plane with services Services.
func setupPushServices(t testing.TB, services int) (*plane, string) {
	ns := env.Namespace(t, nil)
	p := startPlane(t, nil)
	for i := range services {
		name := fmt.Sprintf("svc-%d", i)
		create(t, testgen.Service(ns, name, "", testgen.Port("http", 80, 8080)))
		create(t, testgen.EndpointSlice(ns, name, name+"-a", "http", 8080, testgen.Endpoint{IP: fmt.Sprintf("10.245.%d.%d", i/200, i%200+1)}))
	}
	create(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "client"}})
	return p, ns
}

type loadProxy struct {
	Node  string `json:"node"`
	Token string `json:"token"`
	IP    string `json:"ip"`
	Delta bool   `json:"delta"`
}

// createLoadPods creates n client pods and their pod-bound tokens (half
// of them to connect over state of the world, half delta) and waits until
// the model holds them. With classes > 1 pod i runs as ServiceAccount
// client-<i mod classes>: that many proxy classes.
func createLoadPods(t testing.TB, p *plane, ns string, n, classes int) []loadProxy {
	proxies := make([]loadProxy, n)
	sa := func(int) string { return "client" }
	if classes > 1 {
		for k := range classes {
			create(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("client-%d", k)}})
		}
		sa = func(i int) string { return fmt.Sprintf("client-%d", i%classes) }
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pod := testgen.Pod(ns, fmt.Sprintf("client-%d", i), testgen.WithServiceAccount(sa(i)), testgen.WithIP(fmt.Sprintf("127.1.%d.%d", i/250, i%250+1)))
			create(t, pod)
			proxies[i] = loadProxy{Node: nodeID(pod), Token: token(t, pod, sa(i)), IP: pod.Status.PodIP, Delta: i%2 == 1}
		}()
	}
	wg.Wait()
	p.settle(t)
	return proxies
}

func connectProxies(t testing.TB, p *plane, ns string, proxies []loadProxy) *pushLoad {
	n := len(proxies)
	cluster := fmt.Sprintf("outbound|80||svc-0.%s.svc.cluster.local", ns)
	plan, err := json.Marshal(map[string]any{"addr": p.XDSAddr, "caPEM": string(p.Authority.RootPEM()), "cluster": cluster, "proxies": proxies})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(xdsloadBinary(t))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
	l := &pushLoad{p: p, in: in, out: bufio.NewScanner(outPipe), proxies: n}
	l.out.Buffer(make([]byte, 1<<20), 16<<20)
	if _, err := in.Write(append(plan, '\n')); err != nil {
		t.Fatal(err)
	}
	if !l.out.Scan() || l.out.Text() != "READY" {
		t.Fatalf("xdsload did not get ready: %q %v", l.out.Text(), l.out.Err())
	}
	nodes := make([]string, n)
	for i, px := range proxies {
		nodes[i] = px.Node
	}
	p.settle(t, nodes...)
	l.slice = &discoveryv1.EndpointSlice{}
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "svc-0-a"}, l.slice); err != nil {
		t.Fatal(err)
	}
	return l
}

// change adds an endpoint to svc-0; it returns each proxy's delay (ms,
// sorted) until it held the new endpoints, and the clients' response and
// byte totals.
func (l *pushLoad) change(t testing.TB, endpoints int) ([]float64, int, int) {
	ready := true
	l.slice.Endpoints = append(l.slice.Endpoints, discoveryv1.Endpoint{
		Addresses: []string{fmt.Sprintf("10.246.%d.%d", endpoints/200, endpoints%200+1)}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
	})
	start := time.Now()
	if err := env.Client.Update(context.Background(), l.slice); err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Fprintf(l.in, "WAIT %d %d\n", endpoints, start.UnixNano()); err != nil {
		t.Fatal(err)
	}
	var lat []float64
	var responses, bytes int
	for l.out.Scan() {
		line := l.out.Text()
		switch {
		case strings.HasPrefix(line, "LAT "):
			for _, f := range strings.Split(strings.TrimPrefix(line, "LAT "), ",") {
				v, _ := strconv.ParseFloat(f, 64)
				lat = append(lat, v)
			}
		case strings.HasPrefix(line, "STATS "):
			fmt.Sscanf(line, "STATS %d %d", &responses, &bytes)
			return lat, responses, bytes
		}
	}
	t.Fatalf("xdsload ended: %v", l.out.Err())
	return nil, 0, 0
}

func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	fields := strings.Fields(string(b))
	pages, _ := strconv.ParseUint(fields[1], 10, 64)
	return pages * uint64(os.Getpagesize())
}

func heapInuse() uint64 {
	runtime.GC()
	debug.FreeOSMemory()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// TestPushBenchmarkTwin is the size-2 twin of BenchmarkPush.
func TestPushBenchmarkTwin(t *testing.T) {
	p, ns := setupPushServices(t, 3)
	l := connectProxies(t, p, ns, createLoadPods(t, p, ns, 2, 2))
	lat, responses, _ := l.change(t, 2)
	if len(lat) != 2 {
		t.Fatalf("%d proxies reported", len(lat))
	}
	if responses == 0 {
		t.Error("no responses counted")
	}
}

// BenchmarkPush connects 1,000 proxies and measures, for an endpoint change
// of a Service they all use, each proxy's delay until it holds the new
// endpoints (p50, p99), the responses and bytes the change caused, the
// CPU this process (the controller and its informers; the apiserver and
// the proxies run elsewhere) spent per change, and the controller's memory
// per connected proxy (RSS and Go heap+stacks) — the pods themselves are
// in the baseline, so this is what a connection costs. Sizes: one class
// and 100 Services, and 100 classes (ServiceAccounts) and 200 Services
// (with 1,000 Services the simulated proxies, decoding ~2 MB each on the
// same 2 cores, cannot keep up: their streams end with EOF mid-run).
func BenchmarkPush(b *testing.B) {
	for _, size := range []struct{ proxies, classes, services int }{{1000, 1, 100}, {1000, 100, 200}} {
		b.Run(fmt.Sprintf("proxies=%d/classes=%d/services=%d", size.proxies, size.classes, size.services), func(b *testing.B) {
			n := size.proxies
			p, ns := setupPushServices(b, size.services)
			// The pods exist (in the informer cache and the model) before
			// the baseline: what is measured is the cost of a connection.
			proxies := createLoadPods(b, p, ns, n, size.classes)
			heap0, rss0 := heapInuse(), rssBytes()
			l := connectProxies(b, p, ns, proxies)
			heap1, rss1 := heapInuse(), rssBytes()
			if path := os.Getenv("TRELLIS_HEAP_PROFILE"); path != "" {
				if f, err := os.Create(path); err == nil {
					_ = pprof.WriteHeapProfile(f)
					f.Close()
				}
			}
			var all []float64
			var responses, bytes int
			_, r0, b0 := l.change(b, 2)
			endpoints := 2
			// TRELLIS_CPU_PROFILE=file profiles the changes (not the setup).
			if path := os.Getenv("TRELLIS_CPU_PROFILE"); path != "" {
				if f, err := os.Create(path); err == nil {
					_ = pprof.StartCPUProfile(f)
					defer func() { pprof.StopCPUProfile(); f.Close() }()
				}
			}
			cpu0 := processCPU()
			for b.Loop() {
				endpoints++
				lat, r, by := l.change(b, endpoints)
				all = append(all, lat...)
				responses, bytes = r, by
			}
			cpu := processCPU() - cpu0
			slices.Sort(all)
			changes := float64(endpoints - 2)
			b.ReportMetric(all[len(all)/2], "p50-ms")
			b.ReportMetric(all[len(all)*99/100], "p99-ms")
			b.ReportMetric(cpu.Seconds()/changes, "cpu-s/change")
			b.ReportMetric(float64(responses-r0)/changes, "responses/change")
			b.ReportMetric(float64(bytes-b0)/changes, "bytes/change")
			b.ReportMetric(float64(rss1-rss0)/float64(n)/1024, "KB-RSS/proxy")
			b.ReportMetric(float64(heap1-heap0)/float64(n)/1024, "KB-heap/proxy")
		})
	}
}

// processCPU is the user and system CPU time this process used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
