package xds

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"maps"
	"net/http"
	"slices"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// The debug API, served by the control plane behind the metrics
// endpoint's Kubernetes authentication and authorization (never on a
// listener of its own): trellisctl proxy-status and config-dump read it.
const (
	// DebugProxiesPath lists the connected proxies (ProxyStatus).
	DebugProxiesPath = "/debug/proxies"
	// DebugConfigDumpPath is what is served to one proxy
	// (?namespace=&pod=): ConfigDump.
	DebugConfigDumpPath = "/debug/config_dump"
)

// ConfigDump is what the control plane serves one proxy: every resource
// of its class and its own, as Envoy JSON; secrets are described, never
// dumped (no key leaves the control plane this way).
type ConfigDump struct {
	NodeID    string           `json:"nodeID"`
	Class     string           `json:"class"`
	Resources []DumpedResource `json:"resources"`
	Secrets   []SecretSummary  `json:"secrets,omitempty"`
}

// DumpedResource is one served resource.
type DumpedResource struct {
	Type     string          `json:"type"`
	Name     string          `json:"name"`
	Version  string          `json:"version"`
	Resource json.RawMessage `json:"resource"`
}

// SecretSummary describes an SDS secret without its key: the certificate's
// identity, SANs and validity, or the trust bundle's roots.
type SecretSummary struct {
	Name        string        `json:"name"`
	Version     string        `json:"version"`
	Certificate *CertSummary  `json:"certificate,omitempty"`
	Roots       []CertSummary `json:"roots,omitempty"`
	// PrivateKey says that one is served (its bytes are not shown).
	PrivateKey bool `json:"privateKey,omitempty"`
}

// CertSummary is the public part of a certificate worth reading.
type CertSummary struct {
	Subject   string    `json:"subject"`
	URIs      []string  `json:"uris,omitempty"`
	DNSNames  []string  `json:"dnsNames,omitempty"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	Serial    string    `json:"serial"`
}

// DebugHandler serves the connected proxies (DebugProxiesPath) and a
// proxy's configuration (DebugConfigDumpPath) as JSON; mount it behind
// the authenticated metrics endpoint.
func (s *Server) DebugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+DebugProxiesPath, func(w http.ResponseWriter, r *http.Request) {
		s.writeJSON(w, map[string]any{"proxies": s.Proxies()})
	})
	mux.HandleFunc("GET "+DebugConfigDumpPath, func(w http.ResponseWriter, r *http.Request) {
		ns, pod := r.URL.Query().Get("namespace"), r.URL.Query().Get("pod")
		if ns == "" || pod == "" {
			http.Error(w, "namespace and pod query parameters are required", http.StatusBadRequest)
			return
		}
		dump, err := s.ConfigDump(ns, pod)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		s.writeJSON(w, dump)
	})
	return mux
}

func (s *Server) writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil && !errors.Is(err, http.ErrHandlerTimeout) {
		s.Log.Error(err, "write debug response")
	}
}

// errNotConnected: no proxy of that pod is connected.
var errNotConnected = errors.New("no proxy of that pod is connected to this control plane replica")

// ConfigDump returns what the cache serves the connected proxy of a pod.
func (s *Server) ConfigDump(namespace, pod string) (*ConfigDump, error) {
	nodeID := ""
	for _, p := range s.Proxies() {
		if p.Namespace == namespace && p.Pod == pod {
			nodeID = p.NodeID
			break
		}
	}
	if nodeID == "" {
		return nil, errNotConnected
	}
	class, view, ok := s.Cache.NodeView(nodeID)
	if !ok {
		return nil, errNotConnected
	}
	out := &ConfigDump{NodeID: nodeID, Class: class, Resources: []DumpedResource{}}
	for _, typeURL := range slices.Sorted(maps.Keys(view)) {
		rs := view[typeURL]
		for _, name := range slices.Sorted(maps.Keys(rs)) {
			r := rs[name]
			if typeURL == resource.SecretType {
				sum, err := summarizeSecret(r)
				if err != nil {
					return nil, err
				}
				out.Secrets = append(out.Secrets, sum)
				continue
			}
			m, err := r.Any.UnmarshalNew()
			if err != nil {
				return nil, err
			}
			b, err := protojson.Marshal(m)
			if err != nil {
				return nil, err
			}
			out.Resources = append(out.Resources, DumpedResource{Type: typeURL, Name: name, Version: r.Version, Resource: b})
		}
	}
	return out, nil
}

func summarizeSecret(r *Resource) (SecretSummary, error) {
	var sec tlsv3.Secret
	if err := r.Any.UnmarshalTo(&sec); err != nil {
		return SecretSummary{}, err
	}
	out := SecretSummary{Name: r.Name, Version: r.Version}
	if c := sec.GetTlsCertificate(); c != nil {
		certs := summarizePEM(c.GetCertificateChain().GetInlineBytes())
		if len(certs) > 0 {
			out.Certificate = &certs[0]
		}
		out.PrivateKey = c.GetPrivateKey() != nil
	}
	if v := sec.GetValidationContext(); v != nil {
		out.Roots = summarizePEM(v.GetTrustedCa().GetInlineBytes())
	}
	return out, nil
}

func summarizePEM(b []byte) []CertSummary {
	var out []CertSummary
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return out
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			continue
		}
		cs := CertSummary{Subject: c.Subject.String(), DNSNames: c.DNSNames, NotBefore: c.NotBefore, NotAfter: c.NotAfter, Serial: c.SerialNumber.Text(16)}
		for _, u := range c.URIs {
			cs.URIs = append(cs.URIs, u.String())
		}
		out = append(out, cs)
	}
}
