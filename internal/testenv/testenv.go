// Package testenv starts a real kube-apiserver and etcd (controller-runtime's
// envtest) for integration tests, with the Trellis CRDs and the Gateway API
// route CRDs Trellis reads installed. One
// environment per test package, started from TestMain:
//
//	var env *testenv.Env
//	func TestMain(m *testing.M) { testenv.Main(m, &env) }
//
// The binaries come from KUBEBUILDER_ASSETS, or from bin/k8s in the checkout,
// where `make test` (hack/kube-binaries.sh) builds them from Go modules.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// Env is a running kube-apiserver with etcd.
type Env struct {
	Config *rest.Config
	Client client.Client
	Scheme *runtime.Scheme
	// Root is the repository root (where go.mod of the main module is).
	Root string

	env *envtest.Environment
}

// Options change what Start installs.
type Options struct {
	// CRDDirectories are installed in addition to config/crd/bases.
	CRDDirectories []string
	// WithoutTrellisCRDs leaves config/crd/bases out, for tests that
	// install the Trellis CRDs themselves (the Helm chart's).
	WithoutTrellisCRDs bool
	// WithoutGatewayAPI leaves the Gateway API CRDs out, for tests of a
	// cluster that has none.
	WithoutGatewayAPI bool
	// GatewayAPIExperimental installs the Gateway API experimental
	// channel's CRDs instead of the standard ones.
	GatewayAPIExperimental bool
	// CRDs are installed in addition to the directories.
	CRDs []*apiextensionsv1.CustomResourceDefinition
	// AddToScheme registers further kinds with the client's scheme.
	AddToScheme []func(*runtime.Scheme) error
	// Webhooks are admission webhooks the apiserver calls on the test's
	// local webhook server (envtest fills in host, port and certificates).
	Webhooks *envtest.WebhookInstallOptions
	// APIServerArgs are further kube-apiserver flags (name without the
	// dashes → value), e.g. the kubelet client certificate.
	APIServerArgs map[string]string
}

// Scheme returns a scheme with the core Kubernetes kinds and the Trellis API.
func Scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, err
	}
	if err := apiextensionsv1.AddToScheme(s); err != nil {
		return nil, err
	}
	if err := meshv1alpha1.AddToScheme(s); err != nil {
		return nil, err
	}
	if err := gwv1.Install(s); err != nil {
		return nil, err
	}
	if err := cmapi.AddToScheme(s); err != nil {
		return nil, err
	}
	return s, nil
}

// RepoRoot finds the repository root by walking up from the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "hack", "kube-binaries.sh")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root (with hack/kube-binaries.sh) not found above the working directory")
		}
		dir = parent
	}
}

// AssetsDir is where the kube-apiserver and etcd binaries are: KUBEBUILDER_ASSETS
// when set, else bin/k8s in the checkout.
func AssetsDir(root string) (string, error) {
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		dir = filepath.Join(root, "bin", "k8s")
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("%s not found in %s: run `make kube-binaries` (or `make test`, which does) to build it from Go modules, or set KUBEBUILDER_ASSETS", b, dir)
		}
	}
	return dir, nil
}

// Start starts etcd and kube-apiserver and installs the CRDs.
func Start(opts Options) (*Env, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	assets, err := AssetsDir(root)
	if err != nil {
		return nil, err
	}
	scheme, err := Scheme()
	if err != nil {
		return nil, err
	}
	for _, add := range opts.AddToScheme {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	dirs := []string{filepath.Join(root, "config", "crd", "cert-manager")}
	if !opts.WithoutGatewayAPI {
		gw := "gateway-api"
		if opts.GatewayAPIExperimental {
			gw = "gateway-api-experimental"
		}
		dirs = append(dirs, filepath.Join(root, "config", "crd", gw))
	}
	if !opts.WithoutTrellisCRDs {
		dirs = append(dirs, filepath.Join(root, "config", "crd", "bases"))
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory:    assets,
		CRDDirectoryPaths:        append(dirs, opts.CRDDirectories...),
		CRDs:                     opts.CRDs,
		ErrorIfCRDPathMissing:    true,
		Scheme:                   scheme,
		ControlPlaneStartTimeout: 2 * time.Minute,
		ControlPlaneStopTimeout:  time.Minute,
	}
	if opts.Webhooks != nil {
		env.WebhookInstallOptions = *opts.Webhooks
	}
	for _, k := range slices.Sorted(maps.Keys(opts.APIServerArgs)) {
		env.ControlPlane.GetAPIServer().Configure().Set(k, opts.APIServerArgs[k])
	}
	start := time.Now()
	cfg, err := env.Start()
	if err != nil {
		// envtest leaves the processes running when, e.g., a CRD fails to install.
		_ = env.Stop()
		return nil, fmt.Errorf("start kube-apiserver and etcd from %s: %w", assets, err)
	}
	version := "unknown"
	if dc, err := discovery.NewDiscoveryClientForConfig(cfg); err == nil {
		if v, err := dc.ServerVersion(); err == nil {
			version = v.GitVersion
		}
	}
	fmt.Fprintf(os.Stderr, "testenv: kube-apiserver %s with etcd started at %s in %s (binaries from %s)\n",
		version, cfg.Host, time.Since(start).Round(time.Millisecond), assets)
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		_ = env.Stop()
		return nil, err
	}
	return &Env{Config: cfg, Client: c, Scheme: scheme, Root: root, env: env}, nil
}

// Stop stops kube-apiserver and etcd.
func (e *Env) Stop() error { return e.env.Stop() }

// Environment exposes the envtest environment, e.g. to add users.
func (e *Env) Environment() *envtest.Environment { return e.env }

// Main is the body of a package's TestMain: it starts the environment, runs
// the tests and stops it. A missing binary fails the package loudly rather
// than skipping it.
func Main(m *testing.M, env **Env, opts ...Options) {
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	e, err := Start(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testenv: %v\n", err)
		os.Exit(1)
	}
	*env = e
	code := m.Run()
	if err := e.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: stop: %v\n", err)
	}
	os.Exit(code)
}

// Namespace creates a namespace with a unique name for one test and deletes
// it when the test ends.
func (e *Env) Namespace(t testing.TB, labels map[string]string) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "t-", Labels: labels}}
	ctx := context.Background()
	if err := e.Client.Create(ctx, ns); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() { _ = e.Client.Delete(context.Background(), ns) })
	return ns.Name
}
