package framework

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// KubeletPort is where the stand-in kubelet serves the part of the kubelet
// API the apiserver proxies to (exec, container logs), on GatewayIP.
const KubeletPort = 10250

// KubeletPKI is the TLS between kube-apiserver and the stand-in kubelet,
// as kubeadm sets it up: one CA signs the kubelet's serving certificate
// (for the node's address) and the apiserver's client certificate; each
// side verifies the other. The kubelet authorizes any client the CA signed
// (only the apiserver holds such a certificate), where a real kubelet
// would ask the apiserver (webhook authentication and authorization).
type KubeletPKI struct {
	Dir                               string
	CAFile, ClientCertFile, ClientKey string
	server                            tls.Certificate
	pool                              *x509.CertPool
	caCert                            *x509.Certificate
	caKey                             *ecdsa.PrivateKey
}

// NewKubeletPKI writes the CA and the apiserver's client certificate into
// dir and keeps the kubelet's serving certificate in memory.
func NewKubeletPKI(dir string) (*KubeletPKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &KubeletPKI{Dir: dir, CAFile: filepath.Join(dir, "kubelet-ca.pem"),
		ClientCertFile: filepath.Join(dir, "apiserver-kubelet-client.pem"), ClientKey: filepath.Join(dir, "apiserver-kubelet-client-key.pem")}
	var err error
	if p.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return nil, err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "trellis-e2e-kubelet-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(7 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, ca, ca, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		return nil, err
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, err
	}
	p.pool = x509.NewCertPool()
	p.pool.AddCert(p.caCert)
	if err := os.WriteFile(p.CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := p.issue(&x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.ClientCertFile, certPEM, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.ClientKey, keyPEM, 0o600); err != nil {
		return nil, err
	}
	certPEM, keyPEM, err = p.issue(&x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "system:node:" + NodeName, Organization: []string{"system:nodes"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP(GatewayIP)}, DNSNames: []string{NodeName},
	})
	if err != nil {
		return nil, err
	}
	p.server, err = tls.X509KeyPair(certPEM, keyPEM)
	return p, err
}

func (p *KubeletPKI) issue(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl.NotBefore, tmpl.NotAfter = p.caCert.NotBefore, p.caCert.NotAfter
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), nil
}

// APIServerArgs are the kube-apiserver flags for talking to the kubelet.
func (p *KubeletPKI) APIServerArgs() map[string]string {
	return map[string]string{
		"kubelet-certificate-authority":   p.CAFile,
		"kubelet-client-certificate":      p.ClientCertFile,
		"kubelet-client-key":              p.ClientKey,
		"kubelet-preferred-address-types": "InternalIP",
	}
}

// serveAPI serves the kubelet API on GatewayIP:KubeletPort until ctx ends:
// exec (what kubectl exec and the Gateway API conformance suite use) and
// container logs (kubectl logs).
func (k *Kubelet) serveAPI(ctx context.Context) error {
	if k.PKI == nil {
		return nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/exec/{ns}/{pod}/{container}", k.handleExec)
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", k.handleLogs)
	mux.HandleFunc("/portForward/{ns}/{pod}", k.handlePortForward)
	mux.HandleFunc("/portForward/{ns}/{pod}/{uid}", k.handlePortForward)
	ln, err := net.Listen("tcp", net.JoinHostPort(GatewayIP, strconv.Itoa(KubeletPort)))
	if err != nil {
		return fmt.Errorf("kubelet API: %w", err)
	}
	srv := &http.Server{
		Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{
			MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{k.PKI.server},
			ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: k.PKI.pool,
		},
	}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			k.Logf("kubelet API: %v", err)
		}
	}()
	return nil
}

func (k *Kubelet) handleExec(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodGet && req.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	ns, name, container := req.PathValue("ns"), req.PathValue("pod"), req.PathValue("container")
	r := k.pod(ns, name)
	if r == nil {
		http.Error(w, fmt.Sprintf("pod %s/%s is not running on this node", ns, name), http.StatusNotFound)
		return
	}
	opts, err := remotecommand.NewOptions(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := req.URL.Query()["command"]
	if len(cmd) == 0 {
		http.Error(w, "no command", http.StatusBadRequest)
		return
	}
	remotecommand.ServeExec(w, req, k, ns+"/"+name, string(r.pod.UID), container, cmd, opts,
		4*time.Hour, remotecommandconsts.DefaultStreamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
}

// handlePortForward serves kubectl port-forward (the apiserver's
// pods/portforward, SPDY or WebSocket) with cri-streaming's server, as
// the kubelet's streaming server does.
func (k *Kubelet) handlePortForward(w http.ResponseWriter, req *http.Request) {
	ns, name := req.PathValue("ns"), req.PathValue("pod")
	r := k.pod(ns, name)
	if r == nil {
		http.Error(w, fmt.Sprintf("pod %s/%s is not running on this node", ns, name), http.StatusNotFound)
		return
	}
	opts, err := portforward.NewV4Options(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	portforward.ServePortForward(w, req, k, ns+"/"+name, string(r.pod.UID), opts,
		4*time.Hour, remotecommandconsts.DefaultStreamCreationTimeout, portforward.SupportedProtocols)
}

// PortForward copies a forwarded stream to and from a pod's port, dialled
// on localhost inside the pod's network namespace as the kubelet's
// container runtime does.
func (k *Kubelet) PortForward(ctx context.Context, pod string, _ string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	ns, name, _ := strings.Cut(pod, "/")
	conn, err := k.DialPod(ctx, ns, name, net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("port-forward to %s port %d: %w", pod, port, err)
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); done <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); done <- struct{}{} }()
	<-done
	return nil
}

// ExecInContainer runs cmd as a process of the container: in the pod's
// network namespace, as the container's user, with its environment. The
// command is looked up among the image's commands (ImageCommands), then on
// this host (sh, cat, curl: the host's tools stand in for the image's).
func (k *Kubelet) ExecInContainer(ctx context.Context, pod string, uid string, container string, argv []string, in io.Reader, out, errw io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize, _ time.Duration) error {
	if tty {
		return errors.New("the e2e kubelet has no terminals: run kubectl exec without -t")
	}
	ns, name, _ := strings.Cut(pod, "/")
	r := k.pod(ns, name)
	if r == nil || r.netns == "" || string(r.pod.UID) != uid {
		return fmt.Errorf("pod %s is not running here", pod)
	}
	var c *corev1.Container
	for i := range r.pod.Spec.Containers {
		if r.pod.Spec.Containers[i].Name == container {
			c = &r.pod.Spec.Containers[i]
		}
	}
	for i := range r.pod.Spec.InitContainers {
		if ic := &r.pod.Spec.InitContainers[i]; ic.Name == container && restartable(*ic) {
			c = ic
		}
	}
	if c == nil {
		return fmt.Errorf("pod %s has no running container %s", pod, container)
	}
	bin, ok := k.imageCommand(*c, argv[0])
	if !ok {
		var err error
		if bin, err = exec.LookPath(argv[0]); err != nil {
			return fmt.Errorf("%s: not a command of image %s nor of this host: %w", argv[0], c.Image, err)
		}
	}
	env := r.env(*c)
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", r.netns}, containerCommand(*c, r.hostname(), bin, r.rewrite(*c, env, argv[1:]), k.imageFiles(c.Image))...)...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, errw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return utilexec.ExitErrorWrapper{ExitError: ee}
	}
	return err
}

// imageCommand is the binary a container's image provides under a command
// name (by base name: client, /usr/local/bin/client): its entrypoint (the
// container's command or the binary's own name) or one of ImageCommands.
func (k *Kubelet) imageCommand(c corev1.Container, name string) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	name = filepath.Base(name)
	if bin, ok := k.Images[imageName(c.Image)]; ok && (name == filepath.Base(bin) || len(c.Command) > 0 && name == filepath.Base(c.Command[0])) {
		return bin, true
	}
	bin, ok := k.ImageCommands[imageName(c.Image)][name]
	return bin, ok
}

// handleLogs serves a container's log (kubectl logs [-f] [--tail N]).
func (k *Kubelet) handleLogs(w http.ResponseWriter, req *http.Request) {
	ns, name, container := req.PathValue("ns"), req.PathValue("pod"), req.PathValue("container")
	r := k.pod(ns, name)
	if r == nil || r.dir == "" {
		http.Error(w, fmt.Sprintf("pod %s/%s is not running on this node", ns, name), http.StatusNotFound)
		return
	}
	f, err := os.Open(filepath.Join(r.dir, filepath.Base(container)+".log"))
	if err != nil {
		http.Error(w, fmt.Sprintf("container %s has no log", container), http.StatusNotFound)
		return
	}
	defer f.Close()
	q := req.URL.Query()
	if n, err := strconv.Atoi(q.Get("tailLines")); err == nil && n >= 0 {
		var lines []string
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if len(lines) > n {
				lines = lines[1:]
			}
		}
		for _, l := range lines {
			fmt.Fprintln(w, l)
		}
	} else if _, err := io.Copy(w, f); err != nil {
		return
	}
	if q.Get("follow") != "true" {
		return
	}
	fl, _ := w.(http.Flusher)
	for {
		if fl != nil {
			fl.Flush()
		}
		select {
		case <-req.Context().Done():
			return
		case <-r.ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
		if _, err := io.Copy(w, f); err != nil {
			return
		}
	}
}

// hostname is the pod's hostname (spec.hostname, else its name), which its
// containers see in their own UTS namespace, as on a node.
func (r *podRun) hostname() string {
	h := r.pod.Spec.Hostname
	if h == "" {
		h = r.pod.Name
	}
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-.")
	}
	return h
}

// selfSignedCert writes a self-signed serving certificate for name into
// dir and returns the certificate and key files.
func selfSignedCert(dir, name string) (certFile, keyFile string, err error) {
	p, err := NewKubeletPKI(dir)
	if err != nil {
		return "", "", err
	}
	certPEM, keyPEM, err := p.issue(&x509.Certificate{
		SerialNumber: big.NewInt(4), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, "cert.crt"), filepath.Join(dir, "cert.key")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return "", "", err
	}
	return certFile, keyFile, os.WriteFile(keyFile, keyPEM, 0o644)
}
