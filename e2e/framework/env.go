// Package framework is the e2e environment: a real local control plane
// (etcd, kube-apiserver and kube-controller-manager built from modules),
// trellis-controller as its own process with its webhooks registered in the
// apiserver, and a Kubelet that runs pods as processes in network
// namespaces on a test bridge. `make e2e` and `make demo` use it.
package framework

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
)

// Ports of the control plane on the test bridge and the host.
const (
	XDSPort     = 15012
	WebhookPort = 19443
	HealthPort  = 18091
	MetricsPort = 18092
	// EchoImage is the image name that runs e2e/apps/echo.
	EchoImage = "trellis-e2e/echo:dev"
	// InitImage runs cmd/trellis-init.
	InitImage = "trellis-e2e/trellis-init:dev"
	NodeName  = "trellis-e2e-node"
)

// Env is a running e2e environment.
type Env struct {
	Root, Dir string
	Cluster   *localcluster.Cluster
	Kubelet   *Kubelet
	Bins      map[string]string
	// Envoy is the envoy binary on PATH, or "" (Envoy-path tests skip).
	Envoy string

	net        *network
	cancel     context.CancelFunc
	kubeletErr chan error
	mu         sync.Mutex
	controller *exec.Cmd
	ctrlDone   chan struct{}
	ctrlLog    *os.File
}

// Options configure Start.
type Options struct {
	// Dir receives logs, the kubeconfig and pod directories.
	Dir  string
	Logf func(format string, args ...any)
}

// Build compiles the binaries the environment runs into root/bin/e2e.
func Build(root string) (map[string]string, error) {
	out := filepath.Join(root, "bin", "e2e")
	bins := map[string]string{}
	for name, pkg := range map[string]string{
		"trellis-controller": "./cmd/trellis-controller",
		"trellis-init":       "./cmd/trellis-init",
		"echo":               "./e2e/apps/echo",
		"svid-writer":        "./e2e/apps/svid-writer",
	} {
		bins[name] = filepath.Join(out, name)
		cmd := exec.Command("go", "build", "-o", bins[name], pkg)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build %s: %v\n%s", pkg, err, b)
		}
	}
	return bins, nil
}

// Start brings the environment up. Callers check CheckPrivileges first.
func Start(ctx context.Context, opts Options) (_ *Env, err error) {
	root, err := testenv.RepoRoot()
	if err != nil {
		return nil, err
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	e := &Env{Root: root, Dir: opts.Dir}
	defer func() {
		if err != nil {
			e.Stop()
		}
	}()
	if e.Bins, err = Build(root); err != nil {
		return nil, err
	}
	if p, lerr := exec.LookPath("envoy"); lerr == nil {
		e.Envoy = p
	}
	if e.net, err = newNetwork(); err != nil {
		return nil, fmt.Errorf("pod network: %w", err)
	}
	if e.Cluster, err = localcluster.Start(ctx, localcluster.Options{Dir: opts.Dir}); err != nil {
		return nil, err
	}
	c := e.Cluster.Client()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "trellis-system"}}); err != nil {
		return nil, err
	}
	if err := e.registerWebhooks(ctx); err != nil {
		return nil, err
	}
	if err := e.StartController(ctx); err != nil {
		return nil, err
	}
	if err := e.waitForCABundle(ctx); err != nil {
		return nil, err
	}
	images := map[string]string{imageName(EchoImage): e.Bins["echo"], imageName(InitImage): e.Bins["trellis-init"]}
	if e.Envoy != "" {
		images["envoyproxy/envoy"] = e.Envoy
	}
	kctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.Kubelet = &Kubelet{
		Client: c, Node: NodeName, Dir: filepath.Join(opts.Dir, "pods"), Images: images,
		SVIDWriter: e.Bins["svid-writer"], XDSAddr: fmt.Sprintf("%s:%d", GatewayIP, XDSPort), Logf: opts.Logf, net: e.net,
	}
	e.kubeletErr = make(chan error, 1)
	go func() { e.kubeletErr <- e.Kubelet.Run(kctx) }()
	return e, nil
}

// registerWebhooks creates the injection and validation webhook
// configurations of config/webhook, pointed at the controller on this host;
// the controller fills in their caBundle.
func (e *Env) registerWebhooks(ctx context.Context) error {
	objs, err := localcluster.ReadManifests(filepath.Join(e.Root, "config", "webhook", "manifests.yaml"))
	if err != nil {
		return err
	}
	sel := &metav1.LabelSelector{MatchLabels: map[string]string{"trellis.dev/inject": "enabled"}}
	for _, u := range objs {
		switch u.GetKind() {
		case "MutatingWebhookConfiguration":
			var m admissionv1.MutatingWebhookConfiguration
			if err := fromUnstructured(u.Object, &m); err != nil {
				return err
			}
			m.Name = "trellis-injection"
			for i := range m.Webhooks {
				m.Webhooks[i].ClientConfig = admissionv1.WebhookClientConfig{URL: ptr.To(fmt.Sprintf("https://127.0.0.1:%d%s", WebhookPort, *m.Webhooks[i].ClientConfig.Service.Path))}
				m.Webhooks[i].NamespaceSelector = sel
			}
			if err := e.Cluster.Client().Create(ctx, &m); err != nil {
				return err
			}
		case "ValidatingWebhookConfiguration":
			var v admissionv1.ValidatingWebhookConfiguration
			if err := fromUnstructured(u.Object, &v); err != nil {
				return err
			}
			v.Name = "trellis-validation"
			for i := range v.Webhooks {
				v.Webhooks[i].ClientConfig = admissionv1.WebhookClientConfig{URL: ptr.To(fmt.Sprintf("https://127.0.0.1:%d%s", WebhookPort, *v.Webhooks[i].ClientConfig.Service.Path))}
			}
			if err := e.Cluster.Client().Create(ctx, &v); err != nil {
				return err
			}
		}
	}
	return nil
}

func (e *Env) waitForCABundle(ctx context.Context) error {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		var m admissionv1.MutatingWebhookConfiguration
		if err := e.Cluster.Client().Get(ctx, client.ObjectKey{Name: "trellis-injection"}, &m); err == nil && len(m.Webhooks) > 0 && len(m.Webhooks[0].ClientConfig.CABundle) > 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("the controller did not fill in the injection webhook's caBundle")
}

// StartController starts trellis-controller and waits until it is ready.
func (e *Env) StartController(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	log, err := os.OpenFile(filepath.Join(e.Dir, "trellis-controller.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(e.Bins["trellis-controller"],
		"--kubeconfig="+e.Cluster.Kubeconfig,
		"--leader-elect=false",
		fmt.Sprintf("--metrics-bind-address=127.0.0.1:%d", MetricsPort),
		"--metrics-secure=false",
		fmt.Sprintf("--health-probe-bind-address=127.0.0.1:%d", HealthPort),
		fmt.Sprintf("--xds-address=%s:%d", GatewayIP, XDSPort),
		"--xds-dns-names="+GatewayIP,
		"--xds-service-host="+GatewayIP,
		fmt.Sprintf("--xds-service-port=%d", XDSPort),
		fmt.Sprintf("--webhook-port=%d", WebhookPort),
		"--webhook-dns-names=127.0.0.1",
		"--namespace=trellis-system",
		"--init-image="+InitImage,
		"--xds-root-ca-out="+filepath.Join(e.Dir, "root-ca.pem"),
	)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	e.controller, e.ctrlDone, e.ctrlLog = cmd, done, log
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("trellis-controller exited; see %s", log.Name())
		default:
		}
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", HealthPort)); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("trellis-controller not ready after a minute; see %s", log.Name())
}

// StopController stops trellis-controller (SIGTERM, SIGKILL after 10 s).
func (e *Env) StopController() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.controller == nil {
		return
	}
	_ = e.controller.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.ctrlDone:
	case <-time.After(10 * time.Second):
		_ = e.controller.Process.Kill()
		<-e.ctrlDone
	}
	e.ctrlLog.Close()
	e.controller = nil
}

// ControllerLog is the path of the controller's log.
func (e *Env) ControllerLog() string { return filepath.Join(e.Dir, "trellis-controller.log") }

// Stop tears everything down: pods, their namespaces and the bridge, the
// controller, the Kubernetes processes.
func (e *Env) Stop() {
	if e.cancel != nil {
		e.cancel()
		<-e.kubeletErr
	}
	e.StopController()
	if e.Cluster != nil {
		_ = e.Cluster.Stop()
	}
	if e.net != nil {
		e.net.close()
	}
}

func fromUnstructured(obj map[string]any, into any) error {
	return runtime.DefaultUnstructuredConverter.FromUnstructured(obj, into)
}
