package model_test

import (
	"testing"

	"github.com/trellis-mesh/trellis/pkg/model"
)

func TestProtocolFor(t *testing.T) {
	for _, tt := range []struct {
		name        string
		port        string
		appProtocol string
		want        model.Protocol
	}{
		{"appProtocol http wins over the port name", "tcp-web", "http", model.ProtocolHTTP},
		{"the Kubernetes h2c appProtocol is HTTP/2", "web", "kubernetes.io/h2c", model.ProtocolHTTP2},
		{"appProtocol grpc", "x", "grpc", model.ProtocolGRPC},
		{"appProtocol https is TLS", "x", "https", model.ProtocolTLS},
		{"an unknown appProtocol falls back to the name", "grpc-api", "example.com/custom", model.ProtocolGRPC},
		{"a name prefix before the dash", "http-admin", "", model.ProtocolHTTP},
		{"the name alone", "grpc", "", model.ProtocolGRPC},
		{"http2 by name", "http2", "", model.ProtocolHTTP2},
		{"names are case-insensitive", "HTTP-x", "", model.ProtocolHTTP},
		{"an unnamed port is TCP", "", "", model.ProtocolTCP},
		{"a prefix must be a whole word", "httpx", "", model.ProtocolTCP},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var ap *string
			if tt.appProtocol != "" {
				ap = &tt.appProtocol
			}
			if got := model.ProtocolFor(tt.port, ap); got != tt.want {
				t.Errorf("ProtocolFor(%q, %q) = %q, want %q", tt.port, tt.appProtocol, got, tt.want)
			}
		})
	}
}

func TestSPIFFEID(t *testing.T) {
	if got, want := model.SPIFFEID("example.org", "shop", "frontend"), "spiffe://example.org/ns/shop/sa/frontend"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
