// Command demo is `make demo`: the e2e environment (etcd, kube-apiserver,
// kube-controller-manager, trellis-controller as its own process, pods run
// in network namespaces) with the demo app of config/samples/demo — a plain
// HTTP frontend calling reviews v1/v2 split 80/20 by an HTTPRoute, through
// injected stock Envoy sidecars, under Strict mTLS and an AccessPolicy —
// and a live table of the frontend→reviews traffic for 30 s, read from the
// frontend sidecar's Prometheus stats. With -proxyless it runs the proxyless
// gRPC variant (config/samples/demo-proxyless) and reads the client's log.
// It stays up until Ctrl-C and then removes every process, namespace and
// interface it made. Needs root (network namespaces).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/e2e/framework"
)

const demoNamespace = "demo"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	proxyless := flag.Bool("proxyless", false, "run the proxyless gRPC demo (config/samples/demo-proxyless) instead of the Envoy-sidecar one")
	flag.Parse()
	samples, logName := "demo", "frontend.log"
	if *proxyless {
		samples = "demo-proxyless"
	}
	if err := framework.CheckPrivileges(); err != nil {
		return fmt.Errorf("%v; the demo runs pods in network namespaces", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, err := os.MkdirTemp("", "trellis-demo")
	if err != nil {
		return err
	}
	start := time.Now()
	fmt.Println("demo: building, then starting etcd, kube-apiserver, kube-controller-manager and trellis-controller ...")
	env, err := framework.Start(ctx, framework.Options{Dir: dir, Progress: func(step string, took time.Duration) {
		fmt.Printf("demo:   %-55s %5.1fs\n", step, took.Seconds())
	}})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\ndemo: stopping pods, network namespaces, the controller and the control plane ...")
		env.Stop()
		fmt.Println("demo: stopped; no process, namespace or interface left behind (logs kept in " + dir + ")")
	}()
	// As a Deployment would, a killed or crashed controller is started again.
	go env.KeepControllerRunning(ctx, func(format string, args ...any) { fmt.Printf("demo: "+format+"\n", args...) })
	c := env.Cluster.Client()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: demoNamespace, Labels: map[string]string{"trellis.dev/inject": "enabled"}}}); err != nil {
		return err
	}
	created, err := env.Cluster.Apply(ctx, filepath.Join(env.Root, "config", "samples", samples), demoNamespace)
	if err != nil {
		return err
	}
	fmt.Printf("demo: control plane up and %d objects applied in %s: %s\n", len(created), time.Since(start).Round(100*time.Millisecond), strings.Join(created, " "))
	frontend, podIP, err := waitFrontend(ctx, c, env, logName)
	if err != nil {
		return err
	}
	if *proxyless {
		fmt.Printf("demo: pods running; frontend → reviews traffic for 30 s (frontend log: %s)\n\n", frontend)
		err = table(ctx, frontend, 30*time.Second)
	} else {
		fmt.Printf("demo: pods running; frontend → reviews traffic for 30 s, from the frontend sidecar's stats (http://%s:15020/stats/prometheus)\n\n", podIP)
		err = envoyTable(ctx, podIP, frontend, 30*time.Second)
	}
	if err != nil {
		return err
	}
	fmt.Printf(`
  kubeconfig:  %[1]s
  try:         %[2]s --kubeconfig %[1]s -n demo get pods,endpointslices,httproutes,grpcroutes,accesspolicies -o wide
               %[2]s --kubeconfig %[1]s -n demo scale deployment reviews-v2 --replicas=3
               %[2]s --kubeconfig %[1]s -n demo patch accesspolicy reviews-from-frontend --type=merge -p '{"spec":{"action":"Deny"}}'
               tail -f %[3]s     (the frontend's calls, one JSON line each)
               bin/trellisctl analyze -f config/samples/demo -n demo     (offline checks of the demo's manifests)
               bin/trellisctl analyze --live --kubeconfig %[1]s -n demo     (the same, on what runs)
               bin/trellisctl describe request --live --kubeconfig %[1]s -n demo FRONTEND_POD http://reviews/
               bin/trellisctl describe service reviews --live --kubeconfig %[1]s -n demo
               bin/trellisctl check --kubeconfig %[1]s --controller-address %[7]s:%[5]d
               (check says the controller Deployment has 0 ready replicas: the demo runs the
               controller as a local process, one replica, holding the leader Lease)
  trellis-controller log: %[4]s
               (kill it, e.g. pkill -f bin/e2e/trellis-controller: the demo starts it again, as a
               Deployment would, with the kubelet's back-off: at once, then 10 s, 20 s, … 5 min.
               While it is down, running proxies keep their configuration and traffic flows, but
               new pods in the demo namespace are refused: the injection webhook's failurePolicy
               is Fail, so no pod escapes the mesh; webhooks.injection.failurePolicy=Ignore starts
               them without a sidecar instead. docs/reliability.md "High availability")
  Helm:        make bin/helm && bin/helm --kubeconfig %[1]s -n trellis-system upgrade trellis charts/trellis --reuse-values --set controller.logLevel=debug
               (the release is the chart's; the controller runs as a local process with the
               Deployment's arguments, read again when it restarts: kill it to apply an upgrade)
  connected proxies:   bin/trellisctl proxy-status --kubeconfig %[1]s --controller-address %[7]s:%[5]d
                       (per proxy and xDS type SYNCED/STALE/NACKED; a rejection names the objects behind it)
  served config:       bin/trellisctl config-dump --kubeconfig %[1]s --controller-address %[7]s:%[5]d -n demo POD
  readiness:           curl -s http://127.0.0.1:%[6]d/readyz
  xDS (TLS, token-authenticated): %[7]s:%[8]d
  (metrics and the debug API are served as the chart serves them: HTTPS from the mesh root,
  for a bearer token or a client certificate allowed by a SubjectAccessReview; the
  demo's admin kubeconfig carries a client certificate)

  Press Ctrl-C to stop and clean up.
`, env.Cluster.Kubeconfig, env.Cluster.Kubectl, frontend, env.ControllerLog(),
		framework.MetricsPort, framework.HealthPort, framework.GatewayIP, framework.XDSPort)
	<-ctx.Done()
	return nil
}

// waitFrontend waits until the frontend pod's app runs and returns its log
// and the pod's IP.
func waitFrontend(ctx context.Context, c client.Client, env *framework.Env, logName string) (string, string, error) {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(demoNamespace), client.MatchingLabels{"app": "frontend"}); err == nil {
			for _, p := range pods.Items {
				if d := env.Kubelet.PodDir(demoNamespace, p.Name); d != "" && p.Status.PodIP != "" {
					if _, err := os.Stat(filepath.Join(d, logName)); err == nil {
						return filepath.Join(d, logName), p.Status.PodIP, nil
					}
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return "", "", fmt.Errorf("the frontend pod did not start; logs in %s", env.Dir)
}

type call struct {
	Version  string  `json:"version"`
	Pod      string  `json:"pod"`
	SPIFFEID string  `json:"spiffeID"`
	Code     string  `json:"code"`
	Error    string  `json:"error"`
	MS       float64 `json:"ms"`
}

// row is one second of the frontend→reviews edge.
type row struct {
	requests, ok, v1, v2 float64
	p50, p99             string // "-" when unknown
	caller               string
}

// printTable prints a header, then one row a second for d, from next;
// an error from next is printed in place of that row.
func printTable(ctx context.Context, d time.Duration, next func() (row, error)) {
	fmt.Printf("%-6s %-20s %8s %8s %8s %8s %11s  %s\n", "t", "edge", "req/s", "success", "p50 ms", "p99 ms", "v1/v2 %", "server sees caller as")
	end := time.After(d)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 1; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-end:
			return
		case <-tick.C:
		}
		t := fmt.Sprintf("%ds", i)
		r, err := next()
		if err != nil {
			fmt.Printf("%-6s %v\n", t, err)
			continue
		}
		success, split := "-", "-"
		if r.requests > 0 {
			success = fmt.Sprintf("%.1f%%", 100*r.ok/r.requests)
		}
		if r.ok > 0 {
			split = fmt.Sprintf("%.0f/%.0f", 100*r.v1/r.ok, 100*r.v2/r.ok)
		}
		fmt.Printf("%-6s %-20s %8.0f %8s %8s %8s %11s  %s\n", t, "frontend→reviews", r.requests, success, r.p50, r.p99, split, r.caller)
	}
}

// table follows the proxyless frontend's log: one JSON line per call.
func table(ctx context.Context, path string, d time.Duration) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var pending string
	printTable(ctx, d, func() (row, error) {
		var calls []call
		for {
			line, err := r.ReadString('\n')
			pending += line
			if err == io.EOF {
				break
			}
			if err != nil {
				return row{}, err
			}
			var c call
			if json.Unmarshal([]byte(pending), &c) == nil {
				calls = append(calls, c)
			}
			pending = ""
		}
		out := row{requests: float64(len(calls)), p50: "-", p99: "-"}
		var lat []float64
		ids := map[string]bool{}
		for _, c := range calls {
			lat = append(lat, c.MS)
			if c.Error != "" {
				continue
			}
			out.ok++
			ids[c.SPIFFEID] = true
			if c.Version == "v1" {
				out.v1++
			} else {
				out.v2++
			}
		}
		if len(lat) > 0 {
			slices.Sort(lat)
			pct := func(p float64) string { return fmt.Sprintf("%.2f", lat[min(len(lat)-1, int(p*float64(len(lat))))]) }
			out.p50, out.p99 = pct(0.5), pct(0.99)
		}
		out.caller = strings.Join(mapKeys(ids), ",")
		return out, nil
	})
	return nil
}

func mapKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
