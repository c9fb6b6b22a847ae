package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/xdsclient"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// sdsIdentity reads a proxy's current SDS certificate and trust bundle.
func sdsIdentity(c *xdsclient.Client) (*tls.Certificate, *x509.CertPool, error) {
	res, _ := c.Snapshot()
	cert, ok1 := res[resource.SecretType]["default"].(*tlsv3.Secret)
	bundle, ok2 := res[resource.SecretType]["ROOTCA"].(*tlsv3.Secret)
	if !ok1 || !ok2 {
		return nil, nil, errors.New("no SDS secrets yet")
	}
	pair, err := tls.X509KeyPair(cert.GetTlsCertificate().GetCertificateChain().GetInlineBytes(), cert.GetTlsCertificate().GetPrivateKey().GetInlineBytes())
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(bundle.GetValidationContext().GetTrustedCa().GetInlineBytes())
	return &pair, pool, nil
}

// verifySPIFFE verifies a peer chain against roots and its URI SAN, as mesh
// mTLS does (no host names in SVIDs).
func verifySPIFFE(roots *x509.CertPool, want string, raw [][]byte, usage x509.ExtKeyUsage) error {
	if len(raw) == 0 {
		return errors.New("no peer certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return err
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return err
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
		return fmt.Errorf("peer is %v, want %s", leaf.URIs, want)
	}
	return nil
}

// TestRotationWithoutDroppedHandshakes gives two proxies 2-minute
// certificates over SDS and runs mutual-TLS handshakes between them every
// 100 ms for 2.5 minutes — past the first certificates' expiry — using
// whatever certificate each proxy holds at that moment: every handshake must
// succeed, and both sides must have rotated.
func TestRotationWithoutDroppedHandshakes(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: takes 2.5 minutes (a 2-minute certificate lifetime); run without -short")
	}
	p := startPlane(t, nil)
	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName},
		Spec: meshv1alpha1.MeshConfigSpec{Certificates: meshv1alpha1.Certificates{Lifetime: "2m", RotationPercent: 50}}}
	create(t, mc)
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), mc) })
	deadline := time.Now().Add(wait)
	for p.Pusher.Mesh() == nil || p.Pusher.Mesh().Config.Certificates.Lifetime != "2m" {
		if time.Now().After(deadline) {
			t.Fatal("the MeshConfig did not reach the model")
		}
		time.Sleep(20 * time.Millisecond)
	}
	w := newWorld(t, 90)
	server := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	client := p.connect(t, w.other, token(t, w.other, "other"), nodeID(w.other), true)
	for _, c := range []*xdsclient.Client{server, client} {
		if err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
			return res[resource.SecretType]["default"] != nil && res[resource.SecretType]["ROOTCA"] != nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	hs := startHandshakes(t, server, client, "spiffe://cluster.local/ns/"+w.ns+"/sa/frontend", "spiffe://cluster.local/ns/"+w.ns+"/sa/other")
	time.Sleep(150 * time.Second)
	handshakes, failures, firstFailure := hs.stop()
	serials := hs.serials()
	t.Logf("%d handshakes, %d failed; server certificates %d, client certificates %d", handshakes, failures, len(serials["server"]), len(serials["client"]))
	if failures != 0 {
		t.Errorf("%d of %d handshakes failed across rotation; first: %v", failures, handshakes, firstFailure)
	}
	for side, s := range serials {
		if len(s) < 2 {
			t.Errorf("the %s side never rotated its certificate (%d seen)", side, len(s))
		}
	}
}

// startHandshakes runs mutual-TLS handshakes every 100 ms from client to
// server, each side using the certificate and bundle its proxy holds at
// that moment over SDS, until stop.
func startHandshakes(t testing.TB, server, client *xdsclient.Client, serverID, clientID string) *handshakeLoop {
	h := &handshakeLoop{done: make(chan struct{}), seen: map[string]map[string]bool{"server": {}, "client": {}}}
	seen := func(side string, c *tls.Certificate) {
		leaf, err := x509.ParseCertificate(c.Certificate[0])
		if err == nil {
			h.mu.Lock()
			h.seen[side][leaf.SerialNumber.String()] = true
			h.mu.Unlock()
		}
	}
	lis, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, roots, err := sdsIdentity(server)
			if err != nil {
				return nil, err
			}
			seen("server", cert)
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*cert},
				ClientAuth:   tls.RequireAnyClientCert,
				VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
					return verifySPIFFE(roots, clientID, raw, x509.ExtKeyUsageClientAuth)
				},
			}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.stop(); lis.Close() })
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				buf := make([]byte, 1)
				if _, err := conn.Read(buf); err == nil {
					_, _ = conn.Write(buf)
				}
			}()
		}
	}()
	go func() {
		for {
			select {
			case <-h.done:
				return
			case <-time.After(100 * time.Millisecond):
			}
			h.total.Add(1)
			err := func() error {
				cert, roots, err := sdsIdentity(client)
				if err != nil {
					return err
				}
				seen("client", cert)
				conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), &tls.Config{
					MinVersion:         tls.VersionTLS13,
					Certificates:       []tls.Certificate{*cert},
					InsecureSkipVerify: true, // SVIDs carry no host name: verified below by chain and SPIFFE ID
					VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
						return verifySPIFFE(roots, serverID, raw, x509.ExtKeyUsageServerAuth)
					},
				})
				if err != nil {
					return err
				}
				defer conn.Close()
				if _, err := conn.Write([]byte{1}); err != nil {
					return err
				}
				_, err = conn.Read(make([]byte, 1))
				return err
			}()
			if err != nil {
				h.fails.Add(1)
				h.mu.Lock()
				if h.first == nil {
					h.first = err
				}
				h.mu.Unlock()
			}
		}
	}()
	return h
}

func (h *handshakeLoop) serials() map[string]map[string]bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.seen
}
