// Command demo brings up a local Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager, all built from Go modules), installs
// the Trellis CRDs and config/samples, prints how to reach it and stays up
// until Ctrl-C, then stops every process it started. `make demo` runs it.
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
)

const demoNamespace = "demo"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root, err := testenv.RepoRoot()
	if err != nil {
		return err
	}
	dir := filepath.Join(root, ".demo")
	start := time.Now()
	fmt.Println("demo: starting etcd, kube-apiserver and kube-controller-manager ...")
	cluster, err := localcluster.Start(ctx, localcluster.Options{Dir: dir})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\ndemo: stopping the control plane ...")
		if err := cluster.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "demo: stop: %v\n", err)
		}
		fmt.Println("demo: stopped; no process left behind")
	}()
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "trellis-system"}},
		{ObjectMeta: metav1.ObjectMeta{Name: demoNamespace, Labels: map[string]string{"trellis.dev/inject": "enabled"}}},
	} {
		if err := cluster.Client().Create(ctx, ns); err != nil {
			return fmt.Errorf("create namespace %s: %w", ns.Name, err)
		}
	}
	created, err := cluster.Apply(ctx, filepath.Join(root, "config", "samples"), demoNamespace)
	if err != nil {
		return err
	}
	stopController, err := startController(ctx, root, dir, cluster.Kubeconfig)
	if err != nil {
		return err
	}
	defer stopController()
	fmt.Printf("demo: control plane up in %s; installed the Trellis CRDs and %d samples: %v\n",
		time.Since(start).Round(100*time.Millisecond), len(created), created)
	fmt.Printf(`
  kubeconfig:  %[1]s
  try:         %[2]s --kubeconfig %[1]s get meshconfigs,accesspolicies,backendpolicies,externalservices -A
               %[2]s --kubeconfig %[1]s explain backendpolicy.spec.retries

  trellis-controller runs as its own process (log: %[3]s); xDS on 127.0.0.1:15012 (TLS, root CA in %[4]s).
  The samples' status conditions are written by it: kubectl ... get backendpolicies shows Accepted/Programmed.
  Sidecars and live traffic join the demo as they land (see README "Status").
  Press Ctrl-C to stop and clean up.
`, cluster.Kubeconfig, cluster.Kubectl, filepath.Join(dir, "trellis-controller.log"), filepath.Join(dir, "root-ca.pem"))
	<-ctx.Done()
	return nil
}

// startController runs bin/trellis-controller (built by make demo) against
// the local cluster and waits until it is ready.
func startController(ctx context.Context, root, dir, kubeconfig string) (func(), error) {
	bin := filepath.Join(root, "bin", "trellis-controller")
	log, err := os.Create(filepath.Join(dir, "trellis-controller.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin,
		"--kubeconfig="+kubeconfig,
		"--leader-elect=false",
		"--metrics-bind-address=0",
		"--health-probe-bind-address=127.0.0.1:18081",
		"--xds-address=127.0.0.1:15012",
		"--namespace=trellis-system",
		"--xds-root-ca-out="+filepath.Join(dir, "root-ca.pem"),
	)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (run make demo, which builds it): %w", bin, err)
	}
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		log.Close()
	}
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get("http://127.0.0.1:18081/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return stop, nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			stop()
			return nil, fmt.Errorf("trellis-controller did not become ready; see %s", log.Name())
		}
		time.Sleep(200 * time.Millisecond)
	}
}
