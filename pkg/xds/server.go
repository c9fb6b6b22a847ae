package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/go-logr/logr"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// ProxyStatus is what the debug endpoint (and trellisctl proxy-status)
// shows for a connected proxy.
type ProxyStatus struct {
	NodeID         string            `json:"nodeID"`
	Namespace      string            `json:"namespace"`
	Pod            string            `json:"pod"`
	ServiceAccount string            `json:"serviceAccount"`
	Class          string            `json:"class"`
	Protocol       string            `json:"protocol"` // sotw or delta
	ConnectedAt    time.Time         `json:"connectedAt"`
	Sent           map[string]string `json:"sent"`  // type URL -> last version sent
	Acked          map[string]string `json:"acked"` // type URL -> last version ACKed
	LastNACK       *NACK             `json:"lastNACK,omitempty"`
	// NACKs are the rejections not followed by an ACK yet, by type URL:
	// the proxy runs the last version it accepted of these types.
	NACKs map[string]*NACK `json:"nacks,omitempty"`
	// Identity and CertificateExpiry are of the SVID served to the proxy
	// (empty before the first is issued).
	Identity          string     `json:"identity,omitempty"`
	CertificateExpiry *time.Time `json:"certificateExpiry,omitempty"`
}

// State of one type for a proxy: SYNCED (it ACKed what was sent last),
// NACKED (it rejected what was sent last and runs an older version) or
// STALE (the last version sent is not ACKed yet). The cache answers a
// proxy's open watch as soon as its class changes, so what was sent last
// is the latest the control plane has for it.
func (p *ProxyStatus) State(typeURL string) string {
	switch n := p.NACKs[typeURL]; {
	case n != nil && n.Version == p.Sent[typeURL]:
		return "NACKED"
	case p.Acked[typeURL] == p.Sent[typeURL]:
		return "SYNCED"
	}
	return "STALE"
}

// NACK is a response a proxy rejected.
type NACK struct {
	Type    string    `json:"type"`
	Version string    `json:"version"`
	Message string    `json:"message"`
	At      time.Time `json:"at"`
	// Resources are the served resources the proxy's message names, and
	// Objects the Kubernetes objects they come from (translate.Origins):
	// what to look at first.
	Resources []string    `json:"resources,omitempty"`
	Objects   []model.Ref `json:"objects,omitempty"`
}

// Server is the ADS endpoint: go-control-plane's server over Cache, with
// authentication, ACK/NACK tracking and metrics in its callbacks.
type Server struct {
	Cache   *Cache
	Auth    *Authenticator
	Pusher  *Pusher
	Metrics *Metrics
	Log     logr.Logger
	Clock   clock.PassiveClock
	// OnRejections receives, after every NACK and every ACK that ends
	// one, the objects behind the configuration proxies connected to this
	// replica reject: a Programmed problem per object (RejectedByProxy).
	OnRejections func([]model.Problem)
	// MaxStreams caps the open ADS streams of this replica (0: no cap);
	// one more is refused with RESOURCE_EXHAUSTED, and the proxy's retry
	// may reach another replica through the Service.
	MaxStreams int

	mu sync.Mutex
	// streams by id; go-control-plane numbers state-of-the-world and delta
	// streams separately, so delta ids are stored negated.
	streams map[int64]*streamState
	nodes   map[string]int // node id -> open streams
}

type streamState struct {
	// ctx is the stream's: authentication ends when the stream does.
	ctx           context.Context
	token, peerIP string
	delta         bool
	ident         *Identity
	status        ProxyStatus
	// sentAt is when the push round behind the last response of a type began.
	sentAt map[string]time.Time
}

// NewServer wires a server; call Register to serve it on a gRPC server.
func NewServer(c *Cache, auth *Authenticator, p *Pusher, m *Metrics, log logr.Logger, clk clock.PassiveClock) *Server {
	return &Server{Cache: c, Auth: auth, Pusher: p, Metrics: m, Log: log, Clock: clk, streams: map[int64]*streamState{}, nodes: map[string]int{}}
}

// Register serves ADS (state of the world and delta) on g.
func (s *Server) Register(ctx context.Context, g *grpc.Server) {
	srv := serverv3.NewServer(ctx, s.Cache, s)
	discovery.RegisterAggregatedDiscoveryServiceServer(g, srv)
}

// GRPCOptions are the limits of the xDS gRPC server.
type GRPCOptions struct {
	TLS *tls.Config
	// MaxConnectionAge makes proxies reconnect periodically so they spread
	// across replicas (go-control-plane example server, istiod: 30 min).
	MaxConnectionAge time.Duration
	// MaxConcurrentStreams per connection; a proxy needs one.
	MaxConcurrentStreams uint32
}

// NewGRPCServer returns a gRPC server with TLS, keepalive enforcement and
// connection limits.
func NewGRPCServer(o GRPCOptions) *grpc.Server {
	opts := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(o.MaxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time: 30 * time.Second, Timeout: 10 * time.Second,
			MaxConnectionAge: o.MaxConnectionAge, MaxConnectionAgeGrace: time.Minute,
		}),
		grpc.MaxRecvMsgSize(4 << 20),
		// xDS connections are many and mostly idle: release the write buffer
		// after each flush and keep a small read buffer, so an idle proxy
		// costs the controller a few KB instead of 64 KB of buffers.
		grpc.SharedWriteBuffer(true),
		grpc.ReadBufferSize(4 << 10),
	}
	if o.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(o.TLS)))
	}
	return grpc.NewServer(opts...)
}

// RateLimitedListener accepts at most r new connections per second (burst
// b), so a mass reconnect cannot starve the control plane; excess
// connections wait rather than fail.
func RateLimitedListener(l net.Listener, r rate.Limit, b int) net.Listener {
	return &limitedListener{Listener: l, lim: rate.NewLimiter(r, b)}
}

type limitedListener struct {
	net.Listener
	lim *rate.Limiter
}

func (l *limitedListener) Accept() (net.Conn, error) {
	if err := l.lim.Wait(context.Background()); err != nil {
		return nil, err
	}
	return l.Listener.Accept()
}

func bearer(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if t, ok := strings.CutPrefix(v, "Bearer "); ok {
			return strings.TrimSpace(t)
		}
	}
	return ""
}

func peerIP(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ""
	}
	host, _, err := net.SplitHostPort(p.Addr.String())
	if err != nil {
		return p.Addr.String()
	}
	return host
}

func (s *Server) open(ctx context.Context, id int64, delta bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.MaxStreams > 0 && len(s.streams) >= s.MaxStreams {
		s.Metrics.AuthFailures.WithLabelValues(codes.ResourceExhausted.String()).Inc()
		return status.Errorf(codes.ResourceExhausted, "this control plane replica serves its limit of %d xDS streams (--xds-max-streams); retry: another replica may have room", s.MaxStreams)
	}
	s.streams[id] = &streamState{ctx: ctx, token: bearer(ctx), peerIP: peerIP(ctx), delta: delta, sentAt: map[string]time.Time{}}
	return nil
}

func (s *Server) closed(id int64) {
	s.mu.Lock()
	st := s.streams[id]
	delete(s.streams, id)
	var node string
	last, rejected := false, st != nil && len(st.status.NACKs) > 0
	if st != nil && st.ident != nil {
		node = st.status.NodeID
		s.nodes[node]--
		if s.nodes[node] <= 0 {
			delete(s.nodes, node)
			last = true
		}
		s.Metrics.ConnectedProxies.Dec()
	}
	s.mu.Unlock()
	if last {
		s.Pusher.Disconnect(node)
		s.Cache.UnbindNode(node)
	}
	if rejected {
		s.reportRejections()
	}
}

// request authenticates the first request of a stream and records ACKs and
// NACKs of the later ones.
func (s *Server) request(id int64, node *corev3.Node, typeURL, version, nonce string, errDetail *status.Status) error {
	s.mu.Lock()
	st := s.streams[id]
	s.mu.Unlock()
	if st == nil {
		return status.Error(codes.Internal, "unknown stream")
	}
	if st.ident == nil {
		nodeID := node.GetId()
		ident, err := s.Auth.Authenticate(st.ctx, st.token, st.peerIP, nodeID)
		if err != nil {
			s.Metrics.AuthFailures.WithLabelValues(status.Code(err).String()).Inc()
			s.Log.Info("rejected xDS stream", "node", nodeID, "peer", st.peerIP, "reason", err.Error())
			return err
		}
		proto := "sotw"
		if st.delta {
			proto = "delta"
		}
		s.mu.Lock()
		st.ident = ident
		st.token = "" // not kept longer than needed
		st.status = ProxyStatus{
			NodeID: nodeID, Namespace: ident.NodeID.Namespace, Pod: ident.NodeID.Pod, ServiceAccount: ident.ServiceAccount,
			Protocol: proto, ConnectedAt: s.Clock.Now(), Sent: map[string]string{}, Acked: map[string]string{},
		}
		s.nodes[nodeID]++
		s.mu.Unlock()
		s.Metrics.ConnectedProxies.Inc()
		class := s.Pusher.Connect(ident)
		s.mu.Lock()
		st.status.Class = class
		s.mu.Unlock()
		s.Log.V(2).Info("proxy connected", "node", nodeID, "serviceAccount", ident.ServiceAccount, "protocol", proto)
		return nil
	}
	if node != nil && node.GetId() != "" && node.GetId() != st.status.NodeID {
		return status.Errorf(codes.PermissionDenied, "node id changed from %s to %s on one stream", st.status.NodeID, node.GetId())
	}
	if nonce == "" {
		return nil
	}
	if errDetail != nil {
		defer s.reportRejections()
		resources, objects := s.Pusher.ExplainNACK(st.status.NodeID, typeURL, errDetail.Message())
		s.mu.Lock()
		defer s.mu.Unlock()
		n := &NACK{Type: typeURL, Version: st.status.Sent[typeURL], Message: errDetail.Message(), At: s.Clock.Now(), Resources: resources, Objects: objects}
		st.status.LastNACK = n
		if st.status.NACKs == nil {
			st.status.NACKs = map[string]*NACK{}
		}
		st.status.NACKs[typeURL] = n
		s.Metrics.NACKs.WithLabelValues(shortType(typeURL)).Inc()
		s.Log.Info("proxy rejected configuration; it keeps its last accepted one", "node", st.status.NodeID, "type", shortType(typeURL), "version", n.Version, "error", n.Message, "objects", objects)
		return nil
	}
	s.mu.Lock()
	ended := st.status.NACKs[typeURL] != nil
	delete(st.status.NACKs, typeURL)
	if version != "" && st.status.Acked[typeURL] != version {
		st.status.Acked[typeURL] = version
		if at, ok := st.sentAt[typeURL]; ok && version == st.status.Sent[typeURL] {
			s.Metrics.Convergence.Observe(s.Clock.Since(at).Seconds())
			delete(st.sentAt, typeURL)
		}
	}
	s.mu.Unlock()
	if ended {
		s.reportRejections()
	}
	return nil
}

func (s *Server) response(id int64, typeURL, version string, resources int) {
	s.mu.Lock()
	st := s.streams[id]
	if st == nil {
		s.mu.Unlock()
		return
	}
	node := st.status.NodeID
	s.mu.Unlock()
	// The class can change after connecting (e.g. the pod starts serving a
	// Service); ask the cache, outside our lock.
	class, _ := s.Cache.NodeClass(node)
	at, fromRound := s.Pusher.RoundStart(class)
	s.mu.Lock()
	defer s.mu.Unlock()
	st.status.Class = class
	st.status.Sent[typeURL] = version
	if fromRound && at.After(st.status.ConnectedAt) {
		st.sentAt[typeURL] = at
	}
	s.Metrics.Pushes.WithLabelValues(shortType(typeURL)).Inc()
	s.Metrics.PushedResources.WithLabelValues(shortType(typeURL)).Add(float64(resources))
}

func shortType(typeURL string) string {
	if i := strings.LastIndexByte(typeURL, '.'); i >= 0 {
		return typeURL[i+1:]
	}
	return typeURL
}

// OnStreamOpen implements go-control-plane's callbacks.
func (s *Server) OnStreamOpen(ctx context.Context, id int64, _ string) error {
	return s.open(ctx, id, false)
}

// OnStreamClosed implements go-control-plane's callbacks.
func (s *Server) OnStreamClosed(id int64, _ *corev3.Node) { s.closed(id) }

// OnStreamRequest implements go-control-plane's callbacks.
func (s *Server) OnStreamRequest(id int64, r *discovery.DiscoveryRequest) error {
	var detail *status.Status
	if r.GetErrorDetail() != nil {
		detail = status.FromProto(r.GetErrorDetail())
	}
	return s.request(id, r.GetNode(), r.GetTypeUrl(), r.GetVersionInfo(), r.GetResponseNonce(), detail)
}

// OnStreamResponse implements go-control-plane's callbacks.
func (s *Server) OnStreamResponse(_ context.Context, id int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
	s.response(id, r.GetTypeUrl(), r.GetVersionInfo(), len(r.GetResources()))
}

// OnDeltaStreamOpen implements go-control-plane's callbacks.
func (s *Server) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	return s.open(ctx, -id, true)
}

// OnDeltaStreamClosed implements go-control-plane's callbacks.
func (s *Server) OnDeltaStreamClosed(id int64, _ *corev3.Node) { s.closed(-id) }

// OnStreamDeltaRequest implements go-control-plane's callbacks. Delta
// requests carry no version: an ACK is a request with the response's nonce
// and no error.
func (s *Server) OnStreamDeltaRequest(id int64, r *discovery.DeltaDiscoveryRequest) error {
	id = -id
	var detail *status.Status
	if r.GetErrorDetail() != nil {
		detail = status.FromProto(r.GetErrorDetail())
	}
	version := ""
	if r.GetResponseNonce() != "" {
		s.mu.Lock()
		if st := s.streams[id]; st != nil {
			version = st.status.Sent[r.GetTypeUrl()]
		}
		s.mu.Unlock()
	}
	return s.request(id, r.GetNode(), r.GetTypeUrl(), version, r.GetResponseNonce(), detail)
}

// OnStreamDeltaResponse implements go-control-plane's callbacks.
func (s *Server) OnStreamDeltaResponse(id int64, _ *discovery.DeltaDiscoveryRequest, r *discovery.DeltaDiscoveryResponse) {
	s.response(-id, r.GetTypeUrl(), r.GetSystemVersionInfo(), len(r.GetResources()))
}

// OnFetchRequest rejects REST fetches: only authenticated ADS streams are served.
func (s *Server) OnFetchRequest(context.Context, *discovery.DiscoveryRequest) error {
	return status.Error(codes.Unimplemented, "fetch is not supported; use ADS")
}

// OnFetchResponse implements go-control-plane's callbacks.
func (s *Server) OnFetchResponse(*discovery.DiscoveryRequest, *discovery.DiscoveryResponse) {}

// reportRejections hands OnRejections the objects behind every rejection
// in force on this replica, one problem per object: how many proxies, and
// the message of the first (by pod, then type), so that the same
// rejections always read the same and status is not rewritten for nothing.
func (s *Server) reportRejections() {
	if s.OnRejections == nil {
		return
	}
	type rejection struct {
		proxies []string
		first   *NACK
		firstBy string // pod + type of first
	}
	by := map[model.Ref]*rejection{}
	s.mu.Lock()
	for _, st := range s.streams {
		p := st.status.Namespace + "/" + st.status.Pod
		for typeURL, n := range st.status.NACKs {
			for _, o := range n.Objects {
				r := by[o]
				if r == nil {
					r = &rejection{}
					by[o] = r
				}
				if k := p + " " + typeURL; r.first == nil || k < r.firstBy {
					r.first, r.firstBy = n, k
				}
				if !slices.Contains(r.proxies, p) {
					r.proxies = append(r.proxies, p)
				}
			}
		}
	}
	s.mu.Unlock()
	out := []model.Problem{}
	for o, r := range by {
		slices.Sort(r.proxies)
		shown := r.proxies[:min(len(r.proxies), 3)]
		out = append(out, model.Problem{Object: o, Condition: model.ConditionProgrammed, Reason: model.ReasonRejectedByProxy,
			Message: fmt.Sprintf("%d %s (%s) rejected %s %s and keep the configuration they had: %s",
				len(r.proxies), map[bool]string{true: "proxy", false: "proxies"}[len(r.proxies) == 1], strings.Join(shown, ", "),
				shortType(r.first.Type), strings.Join(r.first.Resources, ", "), r.first.Message)})
	}
	slices.SortFunc(out, func(a, b model.Problem) int { return compareStrings(a.Object.String(), b.Object.String()) })
	s.OnRejections(out)
}

// Proxies lists the connected proxies.
func (s *Server) Proxies() []ProxyStatus {
	s.mu.Lock()
	var out []ProxyStatus
	for _, st := range s.streams {
		if st.ident == nil {
			continue
		}
		ps := st.status
		ps.Sent = maps.Clone(ps.Sent)
		ps.Acked = maps.Clone(ps.Acked)
		ps.NACKs = maps.Clone(ps.NACKs)
		out = append(out, ps)
	}
	s.mu.Unlock()
	for i := range out {
		if id, notAfter := s.Pusher.Certificate(out[i].NodeID); id != "" {
			out[i].Identity, out[i].CertificateExpiry = id, &notAfter
		}
	}
	slices.SortFunc(out, func(a, b ProxyStatus) int {
		return compareStrings(a.Namespace+"/"+a.Pod+"/"+a.Protocol, b.Namespace+"/"+b.Pod+"/"+b.Protocol)
	})
	return out
}

var _ serverv3.Callbacks = (*Server)(nil)
