package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport"
	"k8s.io/client-go/transport/spdy"

	"github.com/trellis-mesh/trellis/pkg/controller"
)

// debugFlags are how trellisctl reaches the controller's debug API: the
// kubeconfig's user (its bearer token or client certificate is presented
// to the controller, which asks the apiserver whether that user may read
// /debug/...) through a port-forward to each ready controller pod, or to
// addresses given with --controller-address.
type debugFlags struct {
	kube                *genericclioptions.ConfigFlags
	controllerNamespace string
	addresses           []string
	caFile              string
	timeout             time.Duration
}

func newDebugFlags() *debugFlags { return &debugFlags{kube: genericclioptions.NewConfigFlags(true)} }

func (d *debugFlags) add(fs *pflag.FlagSet) {
	d.kube.AddFlags(fs)
	fs.StringVar(&d.controllerNamespace, "trellis-namespace", "trellis-system", "namespace Trellis is installed in")
	fs.DurationVar(&d.timeout, "timeout", 30*time.Second, "give up after this long")
	d.addController(fs)
}

// addController adds the flags that say how to reach the controller.
func (d *debugFlags) addController(fs *pflag.FlagSet) {
	fs.StringSliceVar(&d.addresses, "controller-address", nil, "host:port of a controller's metrics endpoint to use instead of port-forwarding to every controller pod (repeatable)")
	fs.StringVar(&d.caFile, "controller-ca-file", "", "PEM roots that verify the controller's certificate (default: ConfigMap trellis-root-ca in the Trellis namespace)")
}

// namespace is kubectl's -n (the pods' namespace), or the context's.
func (d *debugFlags) namespace() string {
	ns, _, err := d.kube.ToRawKubeConfigLoader().Namespace()
	if err != nil || ns == "" {
		return "default"
	}
	return ns
}

// debugConn is a connection to the debug API of every controller replica.
type debugConn struct {
	replicas []replica
	client   *http.Client
	stops    []func()
	// kube is the cluster, as the kubeconfig's user.
	kube kubernetes.Interface
}

type replica struct{ name, base string }

func (c *debugConn) Close() {
	for _, s := range c.stops {
		s()
	}
}

// connect finds the controller replicas and prepares an authenticated
// HTTPS client for them.
func (d *debugFlags) connect(ctx context.Context, errOut io.Writer) (*debugConn, error) {
	cfg, err := d.kube.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	cfg.Timeout = d.timeout
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	roots, err := d.roots(ctx, cs)
	if err != nil {
		return nil, err
	}
	hc, err := debugClient(cfg, roots, d.controllerNamespace)
	if err != nil {
		return nil, err
	}
	conn := &debugConn{client: hc, kube: cs}
	for _, a := range d.addresses {
		conn.replicas = append(conn.replicas, replica{name: a, base: "https://" + a})
	}
	if len(conn.replicas) > 0 {
		return conn, nil
	}
	pods, err := cs.CoreV1().Pods(d.controllerNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=trellis,app.kubernetes.io/component=controller"})
	if err != nil {
		return nil, fmt.Errorf("find the controller pods in %s: %w (or pass --controller-address)", d.controllerNamespace, err)
	}
	for _, p := range pods.Items {
		port := metricsPort(&p)
		if p.Status.Phase != corev1.PodRunning || port == 0 {
			continue
		}
		local, stop, err := forward(cfg, cs, &p, port, errOut)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("port-forward to %s/%s: %w", p.Namespace, p.Name, err)
		}
		conn.stops = append(conn.stops, stop)
		conn.replicas = append(conn.replicas, replica{name: p.Name, base: "https://" + local})
	}
	if len(conn.replicas) == 0 {
		return nil, fmt.Errorf("no running controller pod with a metrics port in %s (is Trellis installed there with metrics.enabled? see trellisctl check)", d.controllerNamespace)
	}
	return conn, nil
}

// roots verify the controller's serving certificate: the mesh's trust
// bundle, which the controller publishes in its own namespace.
func (d *debugFlags) roots(ctx context.Context, cs kubernetes.Interface) (*x509.CertPool, error) {
	var pemData []byte
	if d.caFile != "" {
		b, err := os.ReadFile(d.caFile)
		if err != nil {
			return nil, err
		}
		pemData = b
	} else {
		cm, err := cs.CoreV1().ConfigMaps(d.controllerNamespace).Get(ctx, controller.RootCAConfigMap, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("read the trust bundle (ConfigMap %s/%s) that verifies the controller: %w\n  → bind the Role trellis-debug-reader in %s to your user, or pass --controller-ca-file", d.controllerNamespace, controller.RootCAConfigMap, err, d.controllerNamespace)
		}
		pemData = []byte(cm.Data[controller.RootCAKey])
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, errors.New("the controller's trust bundle holds no certificate")
	}
	return pool, nil
}

// debugClient is an HTTPS client that verifies the controller as
// trellis-metrics.<namespace>.svc and authenticates as the kubeconfig's
// user: its client certificate in the handshake, its token (static, file,
// exec plugin or auth provider) as a bearer header.
func debugClient(cfg *rest.Config, roots *x509.CertPool, namespace string) (*http.Client, error) {
	tc, err := cfg.TransportConfig()
	if err != nil {
		return nil, err
	}
	// The apiserver's trust and name are not the controller's.
	tc.TLS.CAData, tc.TLS.CAFile, tc.TLS.Insecure, tc.TLS.ServerName = nil, "", false, ""
	tlsCfg, err := transport.TLSConfigFor(tc)
	if err != nil {
		return nil, err
	}
	if tlsCfg == nil {
		tlsCfg = &tls.Config{}
	}
	tlsCfg.RootCAs, tlsCfg.ServerName, tlsCfg.MinVersion = roots, "trellis-metrics."+namespace+".svc", tls.VersionTLS12
	rt, err := transport.HTTPWrappersForConfig(tc, &http.Transport{TLSClientConfig: tlsCfg, Proxy: http.ProxyFromEnvironment})
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: rt, Timeout: cfg.Timeout}, nil
}

// metricsPort is the controller container's port named metrics.
func metricsPort(p *corev1.Pod) int32 {
	for _, c := range p.Spec.Containers {
		for _, port := range c.Ports {
			if port.Name == "metrics" {
				return port.ContainerPort
			}
		}
	}
	return 0
}

// forward port-forwards a local port to the pod's port through the
// apiserver, as kubectl port-forward does.
func forward(cfg *rest.Config, cs kubernetes.Interface, p *corev1.Pod, port int32, errOut io.Writer) (string, func(), error) {
	rt, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		return "", nil, err
	}
	u := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(p.Namespace).Name(p.Name).SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:" + strconv.Itoa(int(port))}, stop, ready, io.Discard, errOut)
	if err != nil {
		return "", nil, err
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		return "", nil, err
	case <-time.After(cfg.Timeout):
		close(stop)
		return "", nil, errors.New("timed out")
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		close(stop)
		return "", nil, fmt.Errorf("no local port: %v", err)
	}
	return "127.0.0.1:" + strconv.Itoa(int(ports[0].Local)), func() { close(stop) }, nil
}

// get reads path (with query) from one replica into v.
func (c *debugConn) get(ctx context.Context, r replica, path string, query url.Values, v any) error {
	u := r.base + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return fmt.Errorf("controller %s: %w", r.name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("controller %s: %w", r.name, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return json.Unmarshal(body, v)
	case http.StatusUnauthorized, http.StatusForbidden:
		return fmt.Errorf("controller %s refused %s: %s\n  → bind the ClusterRole trellis-debug-reader to your user (and the Role of that name in the Trellis namespace)", r.name, path, strings.TrimSpace(string(body)))
	case http.StatusNotFound:
		return errNotOnReplica{strings.TrimSpace(string(body))}
	}
	return fmt.Errorf("controller %s: %s: %s", r.name, resp.Status, strings.TrimSpace(string(body)))
}

// errNotOnReplica: the replica has no such proxy (it is connected to
// another one).
type errNotOnReplica struct{ msg string }

func (e errNotOnReplica) Error() string { return e.msg }
