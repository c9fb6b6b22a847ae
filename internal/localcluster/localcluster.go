// Package localcluster runs a small, real Kubernetes control plane on this
// machine: etcd and kube-apiserver (through envtest) plus kube-controller-manager,
// whose Deployment, ReplicaSet and EndpointSlice controllers do the work a
// cluster would. It backs `make demo` and the e2e suite. There is no kubelet:
// pods are run by whoever uses the cluster.
package localcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trellis-mesh/trellis/internal/testenv"

	"github.com/trellis-mesh/trellis/internal/spawn"
)

// Cluster is a running local control plane.
type Cluster struct {
	Env *testenv.Env
	// Kubeconfig is the path of an admin kubeconfig for kubectl and clients.
	Kubeconfig string
	// Kubectl is the path of the kubectl binary built with the others.
	Kubectl string

	kcm *exec.Cmd
	// restarted are kube-apiservers started again by KillAPIServer.
	restarted []*exec.Cmd
}

// Options configure Start.
type Options struct {
	// Dir receives the kubeconfig and the controller-manager's log.
	Dir string
	// Controllers of kube-controller-manager to run.
	Controllers []string
	// GatewayAPIExperimental installs the experimental channel's Gateway
	// API CRDs (default: the standard channel's).
	GatewayAPIExperimental bool
	// APIServerArgs are further kube-apiserver flags (testenv.Options).
	APIServerArgs map[string]string
}

// DefaultControllers are what the demo and e2e need from
// kube-controller-manager: workloads, endpoints, namespace cleanup and GC.
var DefaultControllers = []string{
	"deployment-controller", "replicaset-controller", "endpointslice-controller", "endpointslice-mirroring-controller",
	"serviceaccount-controller", "namespace-controller", "garbage-collector-controller",
}

// Start brings up etcd, kube-apiserver (with the Trellis CRDs) and
// kube-controller-manager.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if opts.Dir == "" {
		return nil, errors.New("localcluster: Options.Dir is required")
	}
	if len(opts.Controllers) == 0 {
		opts.Controllers = DefaultControllers
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, err
	}
	env, err := testenv.Start(testenv.Options{GatewayAPIExperimental: opts.GatewayAPIExperimental, APIServerArgs: opts.APIServerArgs})
	if err != nil {
		return nil, err
	}
	c := &Cluster{Env: env}
	ok := false
	defer func() {
		if !ok {
			_ = c.Stop()
		}
	}()
	admin, err := env.Environment().AddUser(envtest.User{Name: "trellis-admin", Groups: []string{"system:masters"}}, &rest.Config{QPS: 100, Burst: 200})
	if err != nil {
		return nil, fmt.Errorf("add admin user: %w", err)
	}
	kubeconfig, err := admin.KubeConfig()
	if err != nil {
		return nil, fmt.Errorf("admin kubeconfig: %w", err)
	}
	c.Kubeconfig = filepath.Join(opts.Dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, kubeconfig, 0o600); err != nil {
		return nil, err
	}
	assets, err := testenv.AssetsDir(env.Root)
	if err != nil {
		return nil, err
	}
	c.Kubectl = filepath.Join(assets, "kubectl")

	logFile, err := os.Create(filepath.Join(opts.Dir, "kube-controller-manager.log"))
	if err != nil {
		return nil, err
	}
	c.kcm = exec.Command(filepath.Join(assets, "kube-controller-manager"),
		"--kubeconfig="+c.Kubeconfig,
		"--controllers="+strings.Join(opts.Controllers, ","),
		"--leader-elect=false",
		"--secure-port=0",
		"--v=1",
	)
	c.kcm.Stdout, c.kcm.Stderr = logFile, logFile
	// If this process dies, the kernel stops the controller-manager too.
	// (spawn: not when the thread that forked it ends, which once stopped
	// it in the middle of an e2e run.)
	c.kcm.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := spawn.Start(c.kcm); err != nil {
		return nil, fmt.Errorf("start kube-controller-manager: %w", err)
	}
	ok = true
	return c, nil
}

// Apply creates every object of the multi-document YAML manifests in dir
// (files ending in .yaml), in file order; namespaced objects without a
// namespace go to defaultNamespace.
func (c *Cluster) Apply(ctx context.Context, dir, defaultNamespace string) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	var created []string
	for _, f := range files {
		objs, err := ReadManifests(f)
		if err != nil {
			return created, err
		}
		for _, u := range objs {
			if u.GetNamespace() == "" && u.GetKind() != "Namespace" && u.GetKind() != "MeshConfig" {
				u.SetNamespace(defaultNamespace)
			}
			if err := c.Env.Client.Create(ctx, u); err != nil {
				return created, fmt.Errorf("%s: create %s %s: %w", f, u.GetKind(), u.GetName(), err)
			}
			created = append(created, fmt.Sprintf("%s/%s", strings.ToLower(u.GetKind()), u.GetName()))
		}
	}
	return created, nil
}

// ReadManifests parses a multi-document YAML file.
func ReadManifests(path string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out, err := DecodeManifests(f)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return out, nil
}

// DecodeManifests parses multi-document YAML (or JSON), skipping empty
// documents.
func DecodeManifests(r io.Reader) ([]*unstructured.Unstructured, error) {
	dec := yaml.NewYAMLOrJSONDecoder(r, 4096)
	var out []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if len(u.Object) == 0 {
			continue
		}
		out = append(out, u)
	}
}

// Client returns the admin client.
func (c *Cluster) Client() client.Client { return c.Env.Client }

// Stop stops kube-controller-manager, kube-apiserver and etcd.
func (c *Cluster) Stop() error {
	var errs []error
	if c.kcm != nil && c.kcm.Process != nil {
		_ = c.kcm.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- c.kcm.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = c.kcm.Process.Kill()
			<-done
		}
	}
	for _, cmd := range c.restarted {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	if c.Env != nil {
		if err := c.Env.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// child finds the process of this one's children whose command is name
// (envtest starts etcd and kube-apiserver and keeps their handles to
// itself).
func child(name string) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …; comm may hold spaces, not ')'.
		s := string(b)
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < open {
			continue
		}
		f := strings.Fields(s[close+1:])
		if s[open+1:close] == name && len(f) > 1 && f[1] == strconv.Itoa(os.Getpid()) && f[0] != "Z" {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no %s process started by this one", name)
}

// PauseEtcd stops etcd (SIGSTOP: connections stay open, nothing answers,
// as with a hung disk or a partitioned member) until resume is called.
func (c *Cluster) PauseEtcd() (resume func() error, err error) {
	pid, err := child("etcd")
	if err != nil {
		return nil, err
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, err
	}
	return func() error { return syscall.Kill(pid, syscall.SIGCONT) }, nil
}

// KillAPIServer kills kube-apiserver (SIGKILL); restart starts it again
// with the same command line, certificates and port (clients keep their
// configuration) and waits until it is ready. Stop stops the restarted one.
func (c *Cluster) KillAPIServer() (restart func(ctx context.Context) error, err error) {
	pid, err := child("kube-apiserver")
	if err != nil {
		return nil, err
	}
	argv, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	args := strings.Split(strings.TrimRight(string(argv), "\x00"), "\x00")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		// envtest reaps the old process; the port is free once it is gone.
		for {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := spawn.Start(cmd); err != nil {
			return fmt.Errorf("restart kube-apiserver: %w", err)
		}
		c.restarted = append(c.restarted, cmd)
		go func() { _ = cmd.Wait() }()
		cs, err := kubernetes.NewForConfig(c.Env.Config)
		if err != nil {
			return err
		}
		for {
			if b, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx); err == nil && string(b) == "ok" {
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("kube-apiserver not ready after its restart: %w", ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}, nil
}
