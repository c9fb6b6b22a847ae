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
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/chartinstall"
	"github.com/trellis-mesh/trellis/internal/envoy"
	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
)

// Ports of the control plane on the test bridge and the host: the xDS and
// webhook Services' (service.go) and replica 0's health and metrics ports
// (replica i's are 100·i higher).
const (
	XDSPort     = 15012
	WebhookPort = 19443
	HealthPort  = 18091
	MetricsPort = 18092
	// EchoImage is the image name that runs e2e/apps/echo.
	EchoImage = "trellis-e2e/echo:dev"
	// HTTPEchoImage runs e2e/apps/httpecho, a plain HTTP/TCP app.
	HTTPEchoImage = "trellis-e2e/httpecho:dev"
	// EnvoyImage is the sidecar image MeshConfig names by default; it runs
	// the stock Envoy binary (internal/envoy.Binary).
	EnvoyImage = "envoyproxy/envoy"
	// InitImage runs cmd/trellis-init.
	InitImage = "trellis-e2e/trellis-init:dev"
	// EchoAdvancedImage is the Gateway API conformance suite's mesh echo
	// (Istio's test echo server; `client` execs its client).
	EchoAdvancedImage = "registry.k8s.io/gateway-api/echo-advanced"
	NodeName          = "trellis-e2e-node"
)

// Env is a running e2e environment.
type Env struct {
	Root, Dir string
	Cluster   *localcluster.Cluster
	Kubelet   *Kubelet
	Bins      map[string]string
	// Envoy is the stock Envoy binary the sidecars run.
	Envoy string

	net        *network
	dns        *dnsServer
	cancel     context.CancelFunc
	kubeletErr chan error
	services   *services
	mu         sync.Mutex
	replicas   [Replicas]*replica
}

// Options configure Start.
type Options struct {
	// Dir receives logs, the kubeconfig and pod directories.
	Dir  string
	Logf func(format string, args ...any)
	// Progress, if set, hears each step of Start as it ends and how long
	// it took (make demo prints them).
	Progress func(step string, took time.Duration)
}

// Build compiles the binaries the environment runs into root/bin/e2e.
// It uses `go install` (GOBIN=bin/e2e), which relinks a binary only when
// its build ID changed: with nothing changed it takes under a second
// (`go build -o` relinks every binary, ~15 s for these seven on 2 cores),
// so `make demo` and each e2e run start at once.
func Build(root string) (map[string]string, error) {
	out := filepath.Join(root, "bin", "e2e")
	install := func(dir, gobin string, pkgs ...string) error {
		cmd := exec.Command("go", append([]string{"install"}, pkgs...)...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOBIN="+gobin)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go install %s (in %s): %v\n%s", strings.Join(pkgs, " "), dir, err, b)
		}
		return nil
	}
	if err := install(root, out, "./cmd/trellis-controller", "./cmd/trellis-init", "./cmd/trellisctl", "./e2e/apps/echo", "./e2e/apps/httpecho", "./e2e/apps/svid-writer"); err != nil {
		return nil, err
	}
	bins := map[string]string{}
	for _, name := range []string{"trellis-controller", "trellis-init", "trellisctl", "echo", "httpecho", "svid-writer"} {
		bins[name] = filepath.Join(out, name)
	}
	// Istio's test echo server and client, the Gateway API conformance
	// suite's echo-advanced image, from their own module (hack/echo); go
	// install names them server and client, hence their own directory.
	adv := filepath.Join(out, "echo-advanced")
	if err := install(filepath.Join(root, "hack", "echo"), adv, "istio.io/istio/pkg/test/echo/cmd/server", "istio.io/istio/pkg/test/echo/cmd/client"); err != nil {
		return nil, err
	}
	bins["echo-advanced-server"] = filepath.Join(adv, "server")
	bins["echo-advanced-client"] = filepath.Join(adv, "client")
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
	stepStart := time.Now()
	step := func(name string) {
		if opts.Progress != nil {
			opts.Progress(name, time.Since(stepStart))
		}
		stepStart = time.Now()
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
	if e.Envoy, err = envoy.Binary(); err != nil {
		return nil, err
	}
	step("binaries (go install: relinks only what changed)")
	// Sidecars run as UID 1337 and read their pod's volumes under Dir.
	if err := os.Chmod(opts.Dir, 0o755); err != nil {
		return nil, err
	}
	if e.net, err = newNetwork(); err != nil {
		return nil, fmt.Errorf("pod network: %w", err)
	}
	if e.services, err = newServices(); err != nil {
		return nil, fmt.Errorf("the controller's Services: %w", err)
	}
	// Gateway API's experimental channel (a superset of the standard one),
	// so that experimental route fields (HTTPRoute retry) are exercised.
	// The apiserver and the kubelet API (exec, logs) trust each other.
	pki, err := NewKubeletPKI(filepath.Join(opts.Dir, "kubelet-pki"))
	if err != nil {
		return nil, err
	}
	if e.Cluster, err = localcluster.Start(ctx, localcluster.Options{Dir: opts.Dir, GatewayAPIExperimental: true, APIServerArgs: pki.APIServerArgs()}); err != nil {
		return nil, err
	}
	step("etcd, kube-apiserver, kube-controller-manager, CRDs")
	c := e.Cluster.Client()
	if err := e.installChart(ctx); err != nil {
		return nil, err
	}
	step("Helm chart")
	if err := e.StartController(ctx); err != nil {
		return nil, err
	}
	if err := e.waitForCABundle(ctx); err != nil {
		return nil, err
	}
	step("trellis-controller ready, webhooks' caBundle")
	if e.dns, err = startDNS(c, GatewayIP+":53"); err != nil {
		return nil, fmt.Errorf("cluster DNS: %w", err)
	}
	images := map[string]string{
		imageName(EchoImage): e.Bins["echo"], imageName(HTTPEchoImage): e.Bins["httpecho"],
		imageName(InitImage): e.Bins["trellis-init"], EnvoyImage: e.Envoy,
		EchoAdvancedImage: e.Bins["echo-advanced-server"],
	}
	// The echo-advanced image carries the client the suite execs and the
	// serving certificate its TLS port is started with.
	crt, key, err := selfSignedCert(filepath.Join(opts.Dir, "echo-advanced"), "echo")
	if err != nil {
		return nil, err
	}
	kctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.Kubelet = &Kubelet{
		Client: c, Node: NodeName, Dir: filepath.Join(opts.Dir, "pods"), Images: images, PKI: pki,
		ImageCommands: map[string]map[string]string{EchoAdvancedImage: {"client": e.Bins["echo-advanced-client"], "server": e.Bins["echo-advanced-server"]}},
		ImageFiles:    map[string]map[string]string{EchoAdvancedImage: {"/cert.crt": crt, "/cert.key": key}},
		SVIDWriter:    e.Bins["svid-writer"], XDSAddr: fmt.Sprintf("%s:%d", GatewayIP, XDSPort), Logf: opts.Logf, net: e.net,
	}
	e.kubeletErr = make(chan error, 1)
	go func() { e.kubeletErr <- e.Kubelet.Run(kctx) }()
	return e, nil
}

// SetImageFile makes containers of image find hostFile at path (the image
// "carries" it), for containers started from now on; the returned func
// takes the overlay away again (a test's t.Cleanup).
func (e *Env) SetImageFile(image, path, hostFile string) (undo func()) {
	k := e.Kubelet
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.ImageFiles == nil {
		k.ImageFiles = map[string]map[string]string{}
	}
	if k.ImageFiles[image] == nil {
		k.ImageFiles[image] = map[string]string{}
	}
	k.ImageFiles[image][path] = hostFile
	return func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		delete(k.ImageFiles[image], path)
	}
}

// ControllerNamespace is where the chart is installed.
const ControllerNamespace = "trellis-system"

// installChart installs charts/trellis with Helm's Go SDK, as a user would —
// CRDs, ServiceAccount and RBAC, Services, webhook configurations, the
// Deployment — with values for this environment: the init image the
// stand-in kubelet knows, and a nodeSelector no node matches, so the
// Deployment's pod stays Pending as a scheduler would leave it. The
// controller runs instead as a local process with the Deployment's
// arguments and ServiceAccount token (StartController; a restarted one
// takes an upgraded Deployment's arguments), and the webhooks call it by URL
// (chart value webhooks.url; the apiserver here cannot reach Service IPs),
// so `helm upgrade --reuse-values` works on this release. The MeshConfig is
// left to the tests (meshConfig.create=false).
func (e *Env) installChart(ctx context.Context) error {
	repo, tag, _ := strings.Cut(InitImage, ":")
	values := map[string]any{
		"image":      map[string]any{"init": map[string]any{"repository": repo, "tag": tag}},
		"controller": map[string]any{"replicas": 1, "nodeSelector": map[string]any{"trellis.dev/e2e": "controller-runs-as-a-local-process"}},
		"meshConfig": map[string]any{"create": false},
		"webhooks":   map[string]any{"url": fmt.Sprintf("https://127.0.0.1:%d", WebhookPort)},
	}
	_, err := chartinstall.Install(ctx, e.Cluster.Kubeconfig, ControllerNamespace, "trellis", filepath.Join(e.Root, "charts", "trellis"), values)
	return err
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

// AddHost makes the cluster DNS answer name with addr (a test host outside
// the mesh, e.g. for egress).
func (e *Env) AddHost(name string, addr netip.Addr) { e.dns.add(name, addr) }

// ControllerLog is the path of replica 0's log.
func (e *Env) ControllerLog() string { return e.ReplicaLog(0) }

// Stop tears everything down: pods, their namespaces and the bridge, the
// controller, the Kubernetes processes.
func (e *Env) Stop() {
	if e.cancel != nil {
		e.cancel()
		<-e.kubeletErr
	}
	e.StopController()
	if e.dns != nil {
		e.dns.close()
	}
	if e.Cluster != nil {
		_ = e.Cluster.Stop()
	}
	if e.services != nil {
		cleanupServices()
	}
	if e.net != nil {
		e.net.close()
	}
}
