// Command demo brings up a local Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager, all built from Go modules), installs
// the Trellis CRDs and config/samples, prints how to reach it and stays up
// until Ctrl-C, then stops every process it started. `make demo` runs it.
package main

import (
	"context"
	"fmt"
	"os"
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
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: demoNamespace, Labels: map[string]string{"trellis.dev/inject": "enabled"}}}
	if err := cluster.Client().Create(ctx, ns); err != nil {
		return fmt.Errorf("create namespace %s: %w", demoNamespace, err)
	}
	created, err := cluster.Apply(ctx, filepath.Join(root, "config", "samples"), demoNamespace)
	if err != nil {
		return err
	}
	fmt.Printf("demo: control plane up in %s; installed the Trellis CRDs and %d samples: %v\n",
		time.Since(start).Round(100*time.Millisecond), len(created), created)
	fmt.Printf(`
  kubeconfig:  %[1]s
  try:         %[2]s --kubeconfig %[1]s get meshconfigs,accesspolicies,backendpolicies,externalservices -A
               %[2]s --kubeconfig %[1]s explain backendpolicy.spec.retries

  The Trellis controller, sidecars and live traffic join the demo as they land (see README "Status").
  Press Ctrl-C to stop and clean up.
`, cluster.Kubeconfig, cluster.Kubectl)
	<-ctx.Done()
	return nil
}
