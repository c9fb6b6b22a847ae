// Package xdsclient is an ADS client that subscribes the way Envoy does —
// clusters and listeners as wildcards, then the endpoints, routes and
// secrets they reference — over state-of-the-world or delta xDS, and ACKs
// or NACKs each response. Tests and the push benchmark use it as a
// go-control-plane-based proxy stand-in over real gRPC connections.
package xdsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// Dial connects to the xDS server over TLS from localIP ("" for any) and
// sends token as the bearer on every stream.
func Dial(addr string, tlsConf *tls.Config, token, localIP string) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		grpc.WithPerRPCCredentials(bearer(token)),
	}
	if localIP != "" {
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
			return d.DialContext(ctx, "tcp", a)
		}))
	}
	return grpc.NewClient("passthrough:///"+addr, opts...)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	if b == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearer) RequireTransportSecurity() bool { return true }

// Client is one proxy's ADS stream.
type Client struct {
	NodeID string
	Delta  bool
	// Reject, when set, decides to NACK a response (return an error).
	Reject func(typeURL string, resources map[string]proto.Message) error

	mu        sync.Mutex
	resources map[string]map[string]proto.Message
	versions  map[string]map[string]string // delta: per resource; sotw: "" -> type version
	subs      map[string]map[string]bool   // nil: wildcard
	nonces    map[string]string
	responses map[string]int
	bytes     int
	nacked    map[string]string
	err       error
	changed   chan struct{}

	sendSotw  func(*discovery.DiscoveryRequest) error
	sendDelta func(*discovery.DeltaDiscoveryRequest) error
}

// Start opens the ADS stream and subscribes like Envoy. It returns once the
// stream is open; Wait* helpers observe progress.
func Start(ctx context.Context, conn *grpc.ClientConn, nodeID string, delta bool) (*Client, error) {
	return start(ctx, conn, nodeID, delta, nil)
}

// Resume opens a new stream for the proxy prev was, holding prev's
// resources and announcing their versions, as Envoy does when it reconnects.
func Resume(ctx context.Context, conn *grpc.ClientConn, prev *Client) (*Client, error) {
	return start(ctx, conn, prev.NodeID, prev.Delta, prev)
}

func start(ctx context.Context, conn *grpc.ClientConn, nodeID string, delta bool, prev *Client) (*Client, error) {
	c := &Client{
		NodeID: nodeID, Delta: delta,
		resources: map[string]map[string]proto.Message{}, versions: map[string]map[string]string{},
		subs: map[string]map[string]bool{}, nonces: map[string]string{}, responses: map[string]int{},
		nacked: map[string]string{}, changed: make(chan struct{}),
	}
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	node := &corev3.Node{Id: nodeID, Cluster: "trellis-test"}
	if delta {
		st, err := ads.DeltaAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		first := true
		c.sendDelta = func(r *discovery.DeltaDiscoveryRequest) error {
			if first {
				r.Node, first = node, false
			}
			return st.Send(r)
		}
		go c.recvDelta(st)
	} else {
		st, err := ads.StreamAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		first := true
		c.sendSotw = func(r *discovery.DiscoveryRequest) error {
			if first {
				r.Node, first = node, false
			}
			return st.Send(r)
		}
		go c.recvSotw(st)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if prev != nil {
		prev.mu.Lock()
		for t, rs := range prev.resources {
			c.resources[t] = maps.Clone(rs)
		}
		for t, vs := range prev.versions {
			c.versions[t] = maps.Clone(vs)
		}
		for t, ss := range prev.subs {
			c.subs[t] = maps.Clone(ss)
		}
		prev.mu.Unlock()
		for _, t := range []string{resource.ClusterType, resource.ListenerType, resource.EndpointType, resource.RouteType, resource.SecretType} {
			if _, ok := c.subs[t]; !ok {
				continue
			}
			var err error
			if delta {
				r := &discovery.DeltaDiscoveryRequest{TypeUrl: t, InitialResourceVersions: maps.Clone(c.versions[t])}
				if s := c.subs[t]; s != nil {
					r.ResourceNamesSubscribe = slices.Sorted(maps.Keys(s))
				}
				err = c.sendDelta(r)
			} else {
				err = c.request(t, "", nil)
			}
			if err != nil {
				return nil, err
			}
		}
		return c, nil
	}
	for _, t := range []string{resource.ClusterType, resource.ListenerType} {
		c.subs[t] = nil
		if err := c.request(t, "", nil); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Versions returns the versions held: per type, "" maps to the SotW type
// version, other keys are delta per-resource versions.
func (c *Client) Versions() map[string]map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]map[string]string{}
	for t, v := range c.versions {
		out[t] = maps.Clone(v)
	}
	return out
}

// request sends the subscription state of a type (the caller holds mu):
// with nonce it ACKs, with nack set it NACKs.
func (c *Client) request(typeURL, nonce string, nack error) error {
	var detail *status.Status
	if nack != nil {
		detail = &status.Status{Code: 3, Message: nack.Error()}
	}
	if c.Delta {
		r := &discovery.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: nonce, ErrorDetail: detail}
		return c.sendDelta(r)
	}
	r := &discovery.DiscoveryRequest{TypeUrl: typeURL, ResponseNonce: nonce, ErrorDetail: detail, VersionInfo: c.versions[typeURL][""]}
	if s := c.subs[typeURL]; s != nil {
		r.ResourceNames = slices.Sorted(maps.Keys(s))
	}
	return c.sendSotw(r)
}

// subscribe sets the names of a non-wildcard type (caller holds mu).
func (c *Client) subscribe(typeURL string, names map[string]bool) error {
	old, had := c.subs[typeURL]
	if had && maps.Equal(old, names) {
		return nil
	}
	if !had && len(names) == 0 {
		// Like Envoy: no request before there is something to ask for (an
		// empty first request would be a legacy wildcard).
		return nil
	}
	c.subs[typeURL] = names
	// Drop what is no longer subscribed, as Envoy does.
	for n := range c.resources[typeURL] {
		if !names[n] {
			delete(c.resources[typeURL], n)
			delete(c.versions[typeURL], n)
		}
	}
	if c.Delta {
		var sub, unsub []string
		for n := range names {
			if !old[n] {
				sub = append(sub, n)
			}
		}
		for n := range old {
			if !names[n] {
				unsub = append(unsub, n)
			}
		}
		if len(sub) == 0 && len(unsub) == 0 && had {
			return nil
		}
		slices.Sort(sub)
		slices.Sort(unsub)
		return c.sendDelta(&discovery.DeltaDiscoveryRequest{TypeUrl: typeURL, ResourceNamesSubscribe: sub, ResourceNamesUnsubscribe: unsub, ResponseNonce: c.nonces[typeURL]})
	}
	return c.request(typeURL, c.nonces[typeURL], nil)
}

func unpack(anys []*anypb.Any) (map[string]proto.Message, error) {
	out := map[string]proto.Message{}
	for _, a := range anys {
		m, err := a.UnmarshalNew()
		if err != nil {
			return nil, err
		}
		out[resourceName(m)] = m
	}
	return out, nil
}

func resourceName(m proto.Message) string {
	f := m.ProtoReflect().Descriptor().Fields().ByName("name")
	if f == nil {
		f = m.ProtoReflect().Descriptor().Fields().ByName("cluster_name")
	}
	if f == nil {
		return ""
	}
	return m.ProtoReflect().Get(f).String()
}

func (c *Client) recvSotw(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient) {
	for {
		resp, err := st.Recv()
		if err != nil {
			c.fail(err)
			return
		}
		got, err := unpack(resp.Resources)
		if err != nil {
			c.fail(err)
			return
		}
		c.mu.Lock()
		t := resp.TypeUrl
		c.responses[t]++
		c.bytes += proto.Size(resp)
		c.nonces[t] = resp.Nonce
		if c.Reject != nil {
			if rerr := c.Reject(t, got); rerr != nil {
				c.nacked[t] = resp.VersionInfo
				err = c.request(t, resp.Nonce, rerr)
				c.notify()
				c.mu.Unlock()
				if err != nil {
					c.fail(err)
					return
				}
				continue
			}
		}
		if resource.ListenerType == t || resource.ClusterType == t {
			c.resources[t] = got // full state
		} else {
			if c.resources[t] == nil {
				c.resources[t] = map[string]proto.Message{}
			}
			for n, m := range got {
				if s := c.subs[t]; s == nil || s[n] {
					c.resources[t][n] = m
				}
			}
		}
		if c.versions[t] == nil {
			c.versions[t] = map[string]string{}
		}
		c.versions[t][""] = resp.VersionInfo
		err = c.request(t, resp.Nonce, nil)
		if err == nil {
			err = c.follow(t)
		}
		c.notify()
		c.mu.Unlock()
		if err != nil {
			c.fail(err)
			return
		}
	}
}

func (c *Client) recvDelta(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient) {
	for {
		resp, err := st.Recv()
		if err != nil {
			c.fail(err)
			return
		}
		got := map[string]proto.Message{}
		vers := map[string]string{}
		for _, r := range resp.Resources {
			m, err := r.Resource.UnmarshalNew()
			if err != nil {
				c.fail(err)
				return
			}
			got[r.Name] = m
			vers[r.Name] = r.Version
		}
		c.mu.Lock()
		t := resp.TypeUrl
		c.responses[t]++
		c.bytes += proto.Size(resp)
		c.nonces[t] = resp.Nonce
		if c.Reject != nil {
			if rerr := c.Reject(t, got); rerr != nil {
				c.nacked[t] = resp.SystemVersionInfo
				err = c.sendDelta(&discovery.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: resp.Nonce, ErrorDetail: &status.Status{Code: 3, Message: rerr.Error()}})
				c.notify()
				c.mu.Unlock()
				if err != nil {
					c.fail(err)
					return
				}
				continue
			}
		}
		if c.resources[t] == nil {
			c.resources[t] = map[string]proto.Message{}
			c.versions[t] = map[string]string{}
		}
		for n, m := range got {
			c.resources[t][n] = m
			c.versions[t][n] = vers[n]
		}
		for _, n := range resp.RemovedResources {
			delete(c.resources[t], n)
			delete(c.versions[t], n)
		}
		err = c.sendDelta(&discovery.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: resp.Nonce})
		if err == nil {
			err = c.follow(t)
		}
		c.notify()
		c.mu.Unlock()
		if err != nil {
			c.fail(err)
			return
		}
	}
}

// follow subscribes to what clusters and listeners reference (caller holds mu).
func (c *Client) follow(typeURL string) error {
	switch typeURL {
	case resource.ClusterType:
		eds := map[string]bool{}
		for _, m := range c.resources[typeURL] {
			cl := m.(*clusterv3.Cluster)
			if cl.GetType() == clusterv3.Cluster_EDS {
				name := cl.GetEdsClusterConfig().GetServiceName()
				if name == "" {
					name = cl.Name
				}
				eds[name] = true
			}
		}
		if err := c.subscribe(resource.EndpointType, eds); err != nil {
			return err
		}
	case resource.ListenerType:
		rds := map[string]bool{}
		for _, m := range c.resources[typeURL] {
			walk(m.(*listenerv3.Listener).ProtoReflect(), func(msg protoreflect.Message) {
				if h, ok := msg.Interface().(*hcmv3.HttpConnectionManager); ok && h.GetRds() != nil {
					rds[h.GetRds().RouteConfigName] = true
				}
			})
		}
		if err := c.subscribe(resource.RouteType, rds); err != nil {
			return err
		}
	default:
		return nil
	}
	sds := map[string]bool{}
	for _, t := range []string{resource.ClusterType, resource.ListenerType} {
		for _, m := range c.resources[t] {
			walk(m.ProtoReflect(), func(msg protoreflect.Message) {
				if s, ok := msg.Interface().(*tlsv3.SdsSecretConfig); ok {
					sds[s.Name] = true
				}
			})
		}
	}
	return c.subscribe(resource.SecretType, sds)
}

func walk(m protoreflect.Message, f func(protoreflect.Message)) {
	f(m)
	if a, ok := m.Interface().(*anypb.Any); ok {
		if inner, err := a.UnmarshalNew(); err == nil {
			walk(inner.ProtoReflect(), f)
		}
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				walk(v.List().Get(i).Message(), f)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool { walk(mv.Message(), f); return true })
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walk(v.Message(), f)
		}
		return true
	})
}

func (c *Client) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	c.notify()
}

// Err is the error that ended the stream, if any.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Snapshot returns copies of the state: resources by type and name, and the
// number of responses received per type.
func (c *Client) Snapshot() (map[string]map[string]proto.Message, map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	res := map[string]map[string]proto.Message{}
	for t, rs := range c.resources {
		res[t] = maps.Clone(rs)
	}
	return res, maps.Clone(c.responses)
}

// Bytes received so far.
func (c *Client) Bytes() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes
}

// Nacked returns the versions NACKed per type.
func (c *Client) Nacked() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.nacked)
}

// WaitFor blocks until cond holds on the state or ctx ends; it returns the
// stream's error if the stream ends first.
func (c *Client) WaitFor(ctx context.Context, cond func(res map[string]map[string]proto.Message, responses map[string]int) bool) error {
	for {
		c.mu.Lock()
		if cond(c.resources, c.responses) {
			c.mu.Unlock()
			return nil
		}
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return err
		}
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("%w waiting for xDS state of %s", ctx.Err(), c.NodeID)
		}
	}
}

// ErrClosed reports a stream the server ended.
var ErrClosed = errors.New("stream closed")
