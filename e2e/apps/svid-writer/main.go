// Command svid-writer plays cert-manager's csi-driver-spiffe for proxyless
// gRPC pods in the e2e environment: run in the pod's network namespace, it
// fetches the pod's SVID and the trust bundle from Trellis over SDS (as the
// pod: its projected token, from its IP) and keeps tls.crt, tls.key and
// ca.crt in a directory current, replacing them atomically on every push.
// gRPC's file_watcher certificate provider reads them from there.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

func main() {
	xdsAddr := flag.String("xds", "", "xDS server host:port")
	caFile := flag.String("ca", "", "root CA file verifying the xDS server")
	tokenFile := flag.String("token", "", "projected ServiceAccount token file")
	node := flag.String("node", "", "node id")
	out := flag.String("out", "", "directory receiving tls.crt, tls.key and ca.crt")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for ctx.Err() == nil {
		err := run(ctx, *xdsAddr, *caFile, *tokenFile, *node, *out)
		if ctx.Err() != nil {
			return
		}
		fmt.Fprintf(os.Stderr, "svid-writer: %v; reconnecting\n", err)
		time.Sleep(time.Second)
	}
}

type tokenCreds string

func (f tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + strings.TrimSpace(string(b))}, nil
}
func (tokenCreds) RequireTransportSecurity() bool { return true }

func run(ctx context.Context, addr, caFile, tokenFile, node, out string) error {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return errors.New("no certificate in " + caFile)
	}
	host, _, _ := net.SplitHostPort(addr)
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12})),
		grpc.WithPerRPCCredentials(tokenCreds(tokenFile)))
	if err != nil {
		return err
	}
	defer conn.Close()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	req := &discovery.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.SecretType, ResourceNames: []string{"default", "ROOTCA"}}
	if err := st.Send(req); err != nil {
		return err
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		files := map[string][]byte{}
		for _, a := range resp.Resources {
			var s tlsv3.Secret
			if err := a.UnmarshalTo(&s); err != nil {
				return err
			}
			switch s.Name {
			case "default":
				files["tls.crt"] = s.GetTlsCertificate().GetCertificateChain().GetInlineBytes()
				files["tls.key"] = s.GetTlsCertificate().GetPrivateKey().GetInlineBytes()
			case "ROOTCA":
				files["ca.crt"] = s.GetValidationContext().GetTrustedCa().GetInlineBytes()
			}
		}
		// ca.crt first: a new certificate may be signed by a new root.
		for _, name := range []string{"ca.crt", "tls.key", "tls.crt"} {
			if b, ok := files[name]; ok {
				if err := writeAtomic(filepath.Join(out, name), b); err != nil {
					return err
				}
			}
		}
		req = &discovery.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.SecretType, ResourceNames: req.ResourceNames, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce}
		if err := st.Send(req); err != nil {
			return err
		}
	}
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
