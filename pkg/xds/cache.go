package xds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Resource is one marshalled xDS resource with its content version.
type Resource struct {
	Name    string
	Version string
	Any     *anypb.Any
	Size    int
}

// NewResource marshals m deterministically; the version is a hash of the bytes.
func NewResource(name string, m proto.Message) (*Resource, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(b)
	return &Resource{
		Name:    name,
		Version: hex.EncodeToString(sum[:8]),
		Any:     &anypb.Any{TypeUrl: resource.APITypePrefix + string(m.ProtoReflect().Descriptor().FullName()), Value: b},
		Size:    len(b),
	}, nil
}

// Class is the result for one class of proxies: resources by type URL and name.
type Class map[string]map[string]*Resource

// typeSum is the version of a whole type: the XOR of a hash of each
// resource's name and version. It does not depend on order, so a change
// of some resources updates it in what they cost (resourceSum out, in),
// not in a sort and hash of the whole type.
func (c Class) typeSum(typeURL string) uint64 {
	var sum uint64
	for n, r := range c[typeURL] {
		sum ^= resourceSum(n, r.Version)
	}
	return sum
}

// resourceSum is one resource's share of its type's version (FNV-1a:
// every replica computes the same, so a proxy that reconnects elsewhere
// is recognised as up to date).
func resourceSum(name, version string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	h.Write([]byte{0})
	h.Write([]byte(version))
	return h.Sum64()
}

// versionString is a type version as the xDS version_info.
func versionString(sum uint64) string { return fmt.Sprintf("%016x", sum) }

// Cache implements go-control-plane's cache.Cache. Nodes are bound to a
// class key (by the authenticator, from the verified node id); classes are
// set by the pusher. A watch is answered once, when its node's class holds
// something the client's subscription lacks, and kept open otherwise — it is
// never dropped without a response (go-control-plane #1356).
type Cache struct {
	mu      sync.Mutex
	classes map[string]Class
	// versions caches each class's type versions (computed once in SetClass
	// and updated by UpdateResources, not for every response to every
	// proxy of the class).
	versions map[string]map[string]uint64
	nodes    map[string]string // node id -> class key
	// perNode holds resources only one node may see (its own certificate
	// and key over SDS), served on top of its class.
	perNode map[string]Class
	watches map[*watch]struct{}
	// onDemand resolves names a proxy subscribes to that its class does not
	// hold (SetOnDemand).
	onDemand OnDemand

	// OnRespond is called (outside the lock is not guaranteed; keep it
	// cheap) for every response, for metrics.
	OnRespond func(nodeID, typeURL string, resources, bytes int)
}

// NewCache returns an empty cache.
func NewCache() *Cache {
	return &Cache{classes: map[string]Class{}, versions: map[string]map[string]uint64{}, nodes: map[string]string{}, perNode: map[string]Class{}, watches: map[*watch]struct{}{}}
}

type watch struct {
	nodeID string
	sotw   *discovery.DiscoveryRequest
	delta  *discovery.DeltaDiscoveryRequest
	sub    cachev3.Subscription
	ch     chan cachev3.Response
	dch    chan cachev3.DeltaResponse
}

func (w *watch) typeURL() string {
	if w.sotw != nil {
		return w.sotw.GetTypeUrl()
	}
	return w.delta.GetTypeUrl()
}

var errNoNode = errors.New("request without a node id")

// BindNode sets the class a node is served from and answers its open
// watches from the new class.
func (c *Cache) BindNode(nodeID, classKey string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nodes[nodeID] == classKey {
		return
	}
	c.nodes[nodeID] = classKey
	for w := range c.watches {
		if w.nodeID == nodeID {
			c.tryRespond(w)
		}
	}
}

// UnbindNode forgets a node (its streams closed) and its own resources.
func (c *Cache) UnbindNode(nodeID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.nodes, nodeID)
	delete(c.perNode, nodeID)
}

// SetNodeResources sets resources of one type that only nodeID receives,
// on top of its class (e.g. its certificate and private key).
func (c *Cache) SetNodeResources(nodeID, typeURL string, rs map[string]*Resource) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.perNode[nodeID] == nil {
		c.perNode[nodeID] = Class{}
	}
	c.perNode[nodeID][typeURL] = rs
	for w := range c.watches {
		if w.nodeID == nodeID {
			c.tryRespond(w)
		}
	}
}

// OnDemand resolves a resource a proxy subscribed to by name that is not in
// its class, such as a pod-IP cluster discovered on demand (ODCDS). known
// says whether the name is one the resolver answers for; a nil resource
// then means it does not exist (the proxy is told so at once). It runs
// under the cache's lock: it must not call the cache.
type OnDemand func(typeURL, name string) (r *Resource, known bool)

// SetOnDemand sets the resolver of on-demand names; the pusher sets one per
// round, from the round's model, before it sets the classes (which answers
// the watches whose on-demand resources changed).
func (c *Cache) SetOnDemand(f OnDemand) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onDemand = f
}

// NodeClass returns the class key a node is bound to.
func (c *Cache) NodeClass(nodeID string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k, ok := c.nodes[nodeID]
	return k, ok
}

// SetClass replaces a class's resources and answers the open watches of
// its nodes whose subscriptions see a change.
func (c *Cache) SetClass(key string, class Class) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.classes[key] = class
	v := make(map[string]uint64, len(class))
	for typeURL := range class {
		v[typeURL] = class.typeSum(typeURL)
	}
	c.versions[key] = v
	var ws []*watch
	for w := range c.watches {
		if c.nodes[w.nodeID] == key {
			ws = append(ws, w)
		}
	}
	// Make before break (the xDS protocol's ADS ordering): on one ADS
	// stream the responses go out in this order, so a proxy has the
	// secrets, clusters and endpoints a listener or route names before it.
	slices.SortStableFunc(ws, func(a, b *watch) int { return pushOrder(a.typeURL()) - pushOrder(b.typeURL()) })
	for _, w := range ws {
		c.tryRespond(w)
	}
}

// UpdateResources replaces (or adds) resources of one type in a class
// and answers the open watches of that type of its nodes:
// an update that touches a few resources costs what it touches, not a
// whole SetClass. It reports false when the class is not held.
func (c *Cache) UpdateResources(key, typeURL string, rs map[string]*Resource) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	class, ok := c.classes[key]
	if !ok {
		return false
	}
	// In place: every reader of class maps holds the lock or gets copies
	// (NodeView).
	typed := class[typeURL]
	if typed == nil {
		typed = map[string]*Resource{}
		class[typeURL] = typed
	}
	if c.versions[key] == nil {
		c.versions[key] = map[string]uint64{}
	}
	sum := c.versions[key][typeURL]
	for name, r := range rs {
		if old, ok := typed[name]; ok {
			sum ^= resourceSum(name, old.Version)
		}
		sum ^= resourceSum(name, r.Version)
		typed[name] = r
	}
	c.versions[key][typeURL] = sum
	var ws []*watch
	for w := range c.watches {
		if c.nodes[w.nodeID] == key && w.typeURL() == typeURL {
			ws = append(ws, w)
		}
	}
	for _, w := range ws {
		if cachev3.ResourceRequiresFullStateInSotw(typeURL) || c.perNode[w.nodeID][typeURL] != nil {
			c.tryRespond(w)
		} else {
			c.respondUpdated(w, versionString(sum), rs)
		}
	}
	return true
}

// respondUpdated answers an open watch after UpdateResources changed rs,
// in what rs costs rather than what the watch subscribes to. An open watch
// had nothing to receive when it was last checked, and every change since
// answered it (it would not be open), so only rs can be news to it. Only
// for types that are not full-state in SotW (no on-demand names, no
// removals: UpdateResources only adds and replaces).
func (c *Cache) respondUpdated(w *watch, version string, rs map[string]*Resource) {
	known := w.sub.ReturnedResources()
	subscribed := w.sub.SubscribedResources()
	wildcard := w.sub.IsWildcard()
	var changed []*Resource
	for name, r := range rs {
		if _, ok := subscribed[name]; (ok || wildcard) && known[name] != r.Version {
			changed = append(changed, r)
		}
	}
	if len(changed) == 0 {
		return
	}
	returned := maps.Clone(known)
	if returned == nil {
		returned = map[string]string{}
	}
	for _, r := range changed {
		returned[r.Name] = r.Version
	}
	c.deliver(w, version, changed, nil, returned)
}

// Resource returns one resource of a class.
func (c *Cache) Resource(key, typeURL, name string) (*Resource, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.classes[key][typeURL][name]
	return r, ok
}

// HasClass reports whether the class is held.
func (c *Cache) HasClass(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.classes[key]
	return ok
}

// copy copies the maps of a class, not the resources.
func (c Class) copy() Class {
	if c == nil {
		return nil
	}
	out := make(Class, len(c))
	for typeURL, rs := range c {
		out[typeURL] = maps.Clone(rs)
	}
	return out
}

// pushOrder ranks a type for SetClass's responses.
func pushOrder(typeURL string) int {
	switch typeURL {
	case resource.SecretType:
		return 0
	case resource.ClusterType:
		return 1
	case resource.EndpointType:
		return 2
	case resource.ListenerType:
		return 3
	case resource.RouteType:
		return 4
	}
	return 5
}

// Watches is the number of open watches (one per proxy and subscribed
// type while it waits for an update).
func (c *Cache) Watches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.watches)
}

// DeleteClass drops a class no node uses any more.
func (c *Cache) DeleteClass(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.classes, key)
	delete(c.versions, key)
}

// ClassKeys lists the classes held.
func (c *Cache) ClassKeys() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Sorted(maps.Keys(c.classes))
}

// CreateWatch implements cache.ConfigWatcher for state-of-the-world.
func (c *Cache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, ch chan cachev3.Response) (func(), error) {
	if req.GetNode().GetId() == "" {
		return nil, errNoNode
	}
	w := &watch{nodeID: req.GetNode().GetId(), sotw: req, sub: sub, ch: ch}
	return c.add(w), nil
}

// CreateDeltaWatch implements cache.ConfigWatcher for delta xDS.
func (c *Cache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, ch chan cachev3.DeltaResponse) (func(), error) {
	if req.GetNode().GetId() == "" {
		return nil, errNoNode
	}
	w := &watch{nodeID: req.GetNode().GetId(), delta: req, sub: sub, dch: ch}
	return c.add(w), nil
}

func (c *Cache) add(w *watch) func() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.tryRespond(w) {
		c.watches[w] = struct{}{}
	}
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.watches, w)
	}
}

// Fetch is not supported: proxies use ADS streams.
func (c *Cache) Fetch(context.Context, *cachev3.Request) (cachev3.Response, error) {
	return nil, errors.New("fetch is not supported; use ADS")
}

// tryRespond answers w if its node's class has news for it; the caller
// holds the lock. It reports whether it answered (and the watch is done).
func (c *Cache) tryRespond(w *watch) bool {
	key, bound := c.nodes[w.nodeID]
	if !bound {
		return false
	}
	class, ok := c.classes[key]
	if !ok {
		return false
	}
	version := func(typeURL string) string {
		if v, ok := c.versions[key][typeURL]; ok && c.perNode[w.nodeID][typeURL] == nil {
			return versionString(v)
		}
		return versionString(class.typeSum(typeURL))
	}
	class = c.withOwn(class, w.nodeID)
	if w.sotw != nil {
		return c.respondSotw(w, class, version)
	}
	return c.respondDelta(w, class, version)
}

// withOwn is class with nodeID's own resources on top; the caller holds
// the lock.
func (c *Cache) withOwn(class Class, nodeID string) Class {
	own := c.perNode[nodeID]
	if own == nil {
		return class
	}
	merged := Class{}
	maps.Copy(merged, class)
	for typeURL, rs := range own {
		m := map[string]*Resource{}
		maps.Copy(m, class[typeURL])
		maps.Copy(m, rs)
		merged[typeURL] = m
	}
	return merged
}

// NodeView is what the cache serves a node: the class key it is bound to
// and the class's resources with the node's own on top (on-demand ones it
// subscribed to are not included). The maps are copies; the resources are
// shared: read only.
func (c *Cache) NodeView(nodeID string) (key string, view Class, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	key, bound := c.nodes[nodeID]
	if !bound {
		return "", nil, false
	}
	return key, c.withOwn(c.classes[key].copy(), nodeID), true
}

// wanted are the class's resources of the watch's type its subscription
// asks for, plus the on-demand resources it subscribed to by name. missing
// are the on-demand names that do not resolve.
func (c *Cache) wanted(class Class, typeURL string, sub cachev3.Subscription) (want map[string]*Resource, missing []string) {
	all := class[typeURL]
	names := sub.SubscribedResources()
	if sub.IsWildcard() && len(names) == 0 {
		return all, nil
	}
	out := make(map[string]*Resource, len(names))
	if sub.IsWildcard() {
		maps.Copy(out, all)
	}
	for name := range names {
		if r, ok := all[name]; ok {
			out[name] = r
			continue
		}
		if c.onDemand == nil {
			continue
		}
		if r, known := c.onDemand(typeURL, name); r != nil {
			out[name] = r
		} else if known {
			missing = append(missing, name)
		}
	}
	return out, missing
}

// upToDate reports, without allocating, whether a subscription holds
// exactly the class's resources it asks for — the common case of the watch
// a proxy's ACK opens, checked for every proxy after every push. It
// answers false when it cannot tell cheaply (a wildcard with names added,
// a name the class does not hold: on-demand or missing); the caller then
// computes the full answer.
func upToDate(all map[string]*Resource, sub cachev3.Subscription) bool {
	known := sub.ReturnedResources()
	names := sub.SubscribedResources()
	if sub.IsWildcard() {
		if len(names) > 0 || len(known) != len(all) {
			return false
		}
		for n, r := range all {
			if known[n] != r.Version {
				return false
			}
		}
		return true
	}
	for n := range names {
		r, ok := all[n]
		if !ok || known[n] != r.Version {
			return false
		}
	}
	for n := range known {
		if _, ok := names[n]; !ok {
			return false
		}
	}
	return true
}

// respondSotw answers a state-of-the-world watch. Listeners and clusters
// are full-state: any change re-sends all of them. Other types send only the
// changed resources (the xDS protocol lets the server omit unchanged ones).
// The first request for listeners or clusters is always answered, so a
// proxy finishes initialising even when there are none; a NACKed response is
// not repeated until the content changes (no push loop).
func (c *Cache) respondSotw(w *watch, class Class, typeVersion func(string) string) bool {
	typeURL := w.sotw.GetTypeUrl()
	if !(w.sotw.GetResponseNonce() == "" && cachev3.ResourceRequiresFullStateInSotw(typeURL)) && upToDate(class[typeURL], w.sub) {
		return false
	}
	want, _ := c.wanted(class, typeURL, w.sub)
	known := w.sub.ReturnedResources()
	version := typeVersion(typeURL)
	// Only listeners and clusters need an answer to finish initialising when
	// there is nothing (an empty list is meaningful for them); named types
	// wait for their resources.
	initial := w.sotw.GetResponseNonce() == "" && cachev3.ResourceRequiresFullStateInSotw(typeURL)
	if initial && len(known) == 0 && w.sotw.GetVersionInfo() == version {
		// A reconnecting proxy already holds this exact version.
		known = map[string]string{}
		for n, r := range want {
			known[n] = r.Version
		}
		initial = false
	}
	var changed []*Resource
	for _, r := range want {
		if known[r.Name] != r.Version {
			changed = append(changed, r)
		}
	}
	removed := false
	for n := range known {
		if _, ok := want[n]; !ok {
			removed = true
		}
	}
	if len(changed) == 0 && !removed && !initial {
		return false
	}
	send := changed
	if cachev3.ResourceRequiresFullStateInSotw(typeURL) || removed {
		send = slices.Collect(maps.Values(want))
	}
	returned := make(map[string]string, len(want))
	if !cachev3.ResourceRequiresFullStateInSotw(typeURL) && !removed {
		maps.Copy(returned, known)
	}
	for n, r := range want {
		returned[n] = r.Version
	}
	c.deliver(w, version, send, nil, returned)
	return true
}

// respondDelta answers a delta watch with the resources whose version
// differs from what the client holds and the names it holds that are gone.
func (c *Cache) respondDelta(w *watch, class Class, typeVersion func(string) string) bool {
	typeURL := w.delta.GetTypeUrl()
	if !(w.delta.GetResponseNonce() == "" && cachev3.ResourceRequiresFullStateInSotw(typeURL) && w.sub.IsWildcard()) && upToDate(class[typeURL], w.sub) {
		return false
	}
	want, missing := c.wanted(class, typeURL, w.sub)
	known := w.sub.ReturnedResources()
	var changed []*Resource
	for _, r := range want {
		if known[r.Name] != r.Version {
			changed = append(changed, r)
		}
	}
	var removed []string
	for n := range known {
		if _, ok := want[n]; !ok {
			removed = append(removed, n)
		}
	}
	// An on-demand name that does not exist is answered as removed when it
	// is first asked for (the xDS protocol's "does not exist"), so the
	// proxy fails the connection at once instead of after its discovery
	// timeout; later rounds do not repeat it.
	for _, n := range missing {
		if _, held := known[n]; !held && slices.Contains(w.delta.GetResourceNamesSubscribe(), n) {
			removed = append(removed, n)
		}
	}
	initial := w.delta.GetResponseNonce() == "" && cachev3.ResourceRequiresFullStateInSotw(typeURL) && w.sub.IsWildcard()
	if len(changed) == 0 && len(removed) == 0 && !initial {
		return false
	}
	next := make(map[string]string, len(want))
	for n, r := range want {
		next[n] = r.Version
	}
	c.deliver(w, typeVersion(typeURL), changed, removed, next)
	return true
}

// deliver answers w with send (sorted here) and, for delta, the removed
// names; returned is what the client holds once it has the response. The
// watch is done. The caller holds the lock.
func (c *Cache) deliver(w *watch, version string, send []*Resource, removed []string, returned map[string]string) {
	slices.SortFunc(send, func(a, b *Resource) int { return compareStrings(a.Name, b.Name) })
	slices.Sort(removed)
	typeURL := w.typeURL()
	bytes := 0
	for _, r := range send {
		bytes += r.Size
	}
	if w.sotw != nil {
		resp := &discovery.DiscoveryResponse{VersionInfo: version, TypeUrl: typeURL}
		for _, r := range send {
			resp.Resources = append(resp.Resources, r.Any)
		}
		w.ch <- &sotwResponse{req: w.sotw, resp: resp, returned: returned}
	} else {
		resp := &discovery.DeltaDiscoveryResponse{SystemVersionInfo: version, TypeUrl: typeURL, RemovedResources: removed}
		for _, r := range send {
			resp.Resources = append(resp.Resources, &discovery.Resource{Name: r.Name, Version: r.Version, Resource: r.Any})
		}
		w.dch <- &deltaResponse{req: w.delta, resp: resp, next: returned}
	}
	if c.OnRespond != nil {
		c.OnRespond(w.nodeID, typeURL, len(send), bytes)
	}
	delete(c.watches, w)
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// sotwResponse implements cache.Response over a pre-built response; the
// resources inside are shared by every proxy of the class (the server only
// sets the nonce, on its own copy).
type sotwResponse struct {
	req      *discovery.DiscoveryRequest
	resp     *discovery.DiscoveryResponse
	returned map[string]string
}

// GetDiscoveryResponse returns a shallow copy: the server sets the nonce on
// it, and the marshalled resources stay shared and unmodified.
func (r *sotwResponse) GetDiscoveryResponse() (*discovery.DiscoveryResponse, error) {
	return &discovery.DiscoveryResponse{VersionInfo: r.resp.VersionInfo, TypeUrl: r.resp.TypeUrl, Resources: r.resp.Resources}, nil
}
func (r *sotwResponse) GetRequest() *discovery.DiscoveryRequest { return r.req }
func (r *sotwResponse) GetVersion() (string, error)             { return r.resp.VersionInfo, nil }
func (r *sotwResponse) GetResponseVersion() string              { return r.resp.VersionInfo }
func (r *sotwResponse) GetReturnedResources() map[string]string { return r.returned }
func (r *sotwResponse) GetContext() context.Context             { return context.Background() }

type deltaResponse struct {
	req  *discovery.DeltaDiscoveryRequest
	resp *discovery.DeltaDiscoveryResponse
	next map[string]string
}

func (r *deltaResponse) GetDeltaDiscoveryResponse() (*discovery.DeltaDiscoveryResponse, error) {
	return &discovery.DeltaDiscoveryResponse{
		SystemVersionInfo: r.resp.SystemVersionInfo, TypeUrl: r.resp.TypeUrl,
		Resources: r.resp.Resources, RemovedResources: r.resp.RemovedResources,
	}, nil
}
func (r *deltaResponse) GetDeltaRequest() *discovery.DeltaDiscoveryRequest { return r.req }
func (r *deltaResponse) GetSystemVersion() (string, error)                 { return r.resp.SystemVersionInfo, nil }
func (r *deltaResponse) GetResponseVersion() string                        { return r.resp.SystemVersionInfo }
func (r *deltaResponse) GetNextVersionMap() map[string]string              { return r.next }
func (r *deltaResponse) GetReturnedResources() map[string]string           { return r.next }
func (r *deltaResponse) GetContext() context.Context                       { return context.Background() }

var (
	_ cachev3.Cache         = (*Cache)(nil)
	_ cachev3.Response      = (*sotwResponse)(nil)
	_ cachev3.DeltaResponse = (*deltaResponse)(nil)
	_                       = types.UnknownType
)
