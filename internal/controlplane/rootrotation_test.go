package controlplane_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

// TestRootRotationKeepsConnectionsWorking rotates the built-in root while
// two proxies hold mutual-TLS connections (new handshakes every 100 ms):
// every phase is reached, every handshake succeeds, the proxies end with
// certificates from the new root and only the new root is trusted.
func TestRootRotationKeepsConnectionsWorking(t *testing.T) {
	p := startPlane(t, nil, func(o *controlplane.Options) {
		o.RootRotationOverlap = 3 * time.Second
		o.RootRotationTick = 100 * time.Millisecond
	})
	t.Cleanup(func() {
		_ = env.Client.Delete(context.Background(), &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}})
	})
	oldRoot := p.Authority
	w := newWorld(t, 97)
	server := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	cli := p.connect(t, w.other, token(t, w.other, "other"), nodeID(w.other), true)
	for _, c := range []interface {
		WaitFor(context.Context, func(map[string]map[string]proto.Message, map[string]int) bool) error
	}{server, cli} {
		if err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
			return res[resource.SecretType]["default"] != nil && res[resource.SecretType]["ROOTCA"] != nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	hs := startHandshakes(t, server, cli,
		"spiffe://cluster.local/ns/"+w.ns+"/sa/frontend", "spiffe://cluster.local/ns/"+w.ns+"/sa/other")

	// The operator's new root: a self-signed CA made here with crypto/x509.
	certPEM, keyPEM := selfSignedRoot(t)
	newRoot, err := ca.Load(certPEM, keyPEM, clockReal{})
	if err != nil {
		t.Fatal(err)
	}
	create(t, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "trellis-system", Name: "trellis-ca-next"},
		Type:       corev1.SecretTypeTLS,
		Data:       map[string][]byte{corev1.TLSCertKey: newRoot.RootPEM(), corev1.TLSPrivateKeyKey: keyPEM},
	})
	phases := map[meshv1alpha1.RootRotationPhase]bool{}
	deadline := time.Now().Add(wait)
	for {
		var mc meshv1alpha1.MeshConfig
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: "default"}, &mc); err == nil && mc.Status.RootRotation != nil && mc.Status.RootRotation.To == ca.Fingerprint(newRoot) {
			phases[mc.Status.RootRotation.Phase] = true
			if mc.Status.RootRotation.Phase == meshv1alpha1.RootComplete {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotation did not complete; phases seen %v", phases)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, ph := range []meshv1alpha1.RootRotationPhase{meshv1alpha1.RootOverlap, meshv1alpha1.RootReissue, meshv1alpha1.RootComplete} {
		if !phases[ph] {
			t.Errorf("phase %s not observed (seen %v)", ph, phases)
		}
	}
	// Keep handshaking a little after completion, then stop.
	time.Sleep(time.Second)
	total, failed, first := hs.stop()
	if failed != 0 {
		t.Errorf("%d of %d handshakes failed during root rotation; first: %v", failed, total, first)
	}
	t.Logf("%d handshakes during root rotation, %d failed", total, failed)

	// The Secrets now hold only the new root.
	var s corev1.Secret
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: "trellis-system", Name: "trellis-ca"}, &s); err != nil || string(s.Data[corev1.TLSCertKey]) != string(newRoot.RootPEM()) {
		t.Errorf("trellis-ca does not hold the new root (err %v)", err)
	}
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: "trellis-system", Name: "trellis-ca-next"}, &s); !apierrors.IsNotFound(err) {
		t.Errorf("trellis-ca-next still exists (err %v)", err)
	}
	// Both proxies end with a certificate from the new root and trust only it.
	deadline = time.Now().Add(wait)
	for _, c := range []interface {
		Snapshot() (map[string]map[string]proto.Message, map[string]int)
	}{server, cli} {
		for {
			res, _ := c.Snapshot()
			sec := res[resource.SecretType]["default"].(*tlsv3.Secret)
			b, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			cert, _ := x509.ParseCertificate(b.Bytes)
			bundle := res[resource.SecretType]["ROOTCA"].(*tlsv3.Secret).GetValidationContext().GetTrustedCa().GetInlineBytes()
			_, verr := cert.Verify(x509.VerifyOptions{Roots: rootPool(newRoot), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			if verr == nil && string(bundle) == string(newRoot.RootPEM()) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("proxy did not end on the new root only (verify: %v)", verr)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// A sidecar started before the rotation trusts only the old root for its
	// xDS channel (Envoy reads those roots once): it must still verify the
	// control plane — through the cross-signed root the serving chain
	// carries —, now and after a restart; a new sidecar trusts the new root.
	handshake := func(what string, root *ca.Authority) {
		t.Helper()
		pool := x509.NewCertPool()
		pool.AddCert(root.Root())
		conn, err := tls.Dial("tcp", p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}})
		if err != nil {
			t.Errorf("%s: a client trusting only the %s root: %v", what, map[bool]string{true: "old", false: "new"}[root == oldRoot], err)
			return
		}
		conn.Close()
	}
	handshake("after completion", oldRoot)
	handshake("after completion", newRoot)
	p.stop()
	p = startPlane(t, nil, func(o *controlplane.Options) { o.RootRotationTick = 100 * time.Millisecond })
	handshake("after a restart", oldRoot)
	handshake("after a restart", newRoot)
}

func selfSignedRoot(t *testing.T) ([]byte, []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: fmt.Sprintf("next root %d", time.Now().UnixNano())},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd})
}

type handshakeLoop struct {
	stopOnce     sync.Once
	done         chan struct{}
	total, fails atomic.Int64
	mu           sync.Mutex
	first        error
	seen         map[string]map[string]bool
}

func (h *handshakeLoop) stop() (int64, int64, error) {
	h.stopOnce.Do(func() { close(h.done) })
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.total.Load(), h.fails.Load(), h.first
}
