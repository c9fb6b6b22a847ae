package xds

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr"
	"golang.org/x/sync/errgroup"
	"k8s.io/utils/clock"

	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// Pusher turns model updates into class results in the Cache. Updates are
// debounced as istiod does: a round starts after Debounce without a new
// update, or MaxDelay after the first one, one round at a time. Only the
// classes of connected proxies are computed, with bounded concurrency; a
// result that fails validation is not served and the class keeps its last
// good result.
type Pusher struct {
	Cache    *Cache
	Metrics  *Metrics
	Log      logr.Logger
	Clock    clock.WithTickerAndDelayedExecution
	Debounce time.Duration
	MaxDelay time.Duration
	// Concurrency bounds parallel translations (default: number of CPUs).
	Concurrency int
	// OnProblems receives the translator's problems after each round.
	OnProblems func([]model.Problem)
	// NodeSecrets, when set, is asked for the SDS resources of a newly
	// connected node (its certificate and the trust bundle), and again when
	// they are due for renewal.
	NodeSecrets func(ctx context.Context, id *Identity) (*NodeSecrets, error)
	// Renewals runs NodeSecrets per connected node: its deadline, retries
	// and renewal times (NewPusher sets it up on Clock, logging failures).
	Renewals *ca.Renewals
	// OnExpiry reports the soonest certificate expiry per identity
	// (zero time: no proxy of the identity is connected).
	OnExpiry func(identity string, soonest time.Time)

	mu         sync.Mutex
	mesh       *model.Mesh
	pushed     *model.Mesh
	firstEvent time.Time
	nodes      map[string]*nodeInfo
	// secretsMu orders the serving of certificates (loadSecrets).
	secretsMu sync.Mutex
	classes   map[string]*classInfo
	trigger   chan struct{}
	kick      chan struct{}
	// fullRoundsOnly turns the endpoint-only path off (benchmarks compare).
	fullRoundsOnly bool
}

type nodeInfo struct {
	ident *Identity
	// class is the key the node is bound to; lastKey the one the last
	// round computed for it (they differ while that class has no result).
	class, lastKey string
	identity       string
	notAfter       time.Time
}

type classInfo struct {
	roundStart time.Time
	// mesh is the model the class's served result was computed from and
	// problems the translator found in it: a round whose model differs
	// from it in endpoints only recomputes just those.
	mesh     *model.Mesh
	problems []model.Problem
}

// NewPusher returns a pusher with istiod's default timings.
func NewPusher(c *Cache, m *Metrics, log logr.Logger, clk clock.WithTickerAndDelayedExecution) *Pusher {
	return &Pusher{
		Cache: c, Metrics: m, Log: log, Clock: clk,
		Debounce: 100 * time.Millisecond, MaxDelay: 10 * time.Second,
		Renewals: &ca.Renewals{Clock: clk, OnFailure: func(node string, err error, retryIn time.Duration) {
			log.Error(err, "issue workload certificate; retrying", "node", node, "retryIn", retryIn.String())
		}},
		nodes: map[string]*nodeInfo{}, classes: map[string]*classInfo{},
		trigger: make(chan struct{}, 1), kick: make(chan struct{}, 1),
	}
}

// Update hands the pusher a new model; it is pushed after the debounce.
func (p *Pusher) Update(mesh *model.Mesh) {
	p.mu.Lock()
	p.mesh = mesh
	if p.firstEvent.IsZero() {
		p.firstEvent = p.Clock.Now()
	}
	p.mu.Unlock()
	select {
	case p.trigger <- struct{}{}:
	default:
	}
}

// Connect registers an authenticated proxy and binds it to its class,
// computing the class right away if no proxy of it is connected yet.
func (p *Pusher) Connect(id *Identity) string {
	p.mu.Lock()
	mesh := p.pushed
	if mesh == nil {
		mesh = p.mesh
	}
	key := ""
	if mesh != nil {
		if w := mesh.Workload(id.NodeID.Namespace, id.NodeID.Pod); w != nil {
			key = translate.ClassKey(mesh, w)
		}
	}
	nodeID := id.NodeID.String()
	n := &nodeInfo{ident: id, class: key}
	p.nodes[nodeID] = n
	_, known := p.classes[key]
	p.mu.Unlock()
	if key != "" {
		// Bound even before the class exists: its watches are answered
		// when the round below sets it.
		p.Cache.BindNode(nodeID, key)
	}
	if !known {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
	if p.NodeSecrets != nil {
		// A reconnect restarts the node's renewals: its issuances in
		// flight end.
		p.Renewals.Start(nodeID, p.issueFor(nodeID, n))
	}
	return key
}

// issueFor issues a node's certificate and trust bundle; serving them
// records the identity's expiry and hands them to the node's stream.
func (p *Pusher) issueFor(nodeID string, n *nodeInfo) ca.IssueFunc {
	return func(ctx context.Context) (ca.Issuance, error) {
		ns, err := p.NodeSecrets(ctx, n.ident)
		if err != nil {
			return ca.Issuance{}, err
		}
		return ca.Issuance{RotateAt: ns.RotateAt, Serve: func() {
			p.mu.Lock()
			n.identity, n.notAfter = ns.Identity, ns.NotAfter
			p.mu.Unlock()
			p.Cache.SetNodeResources(nodeID, resource.SecretType, ns.Resources)
			p.reportExpiry(ns.Identity)
		}}, nil
	}
}

// RefreshSecrets re-issues the certificates of every connected proxy now
// (after the signer or the trust bundle changed).
func (p *Pusher) RefreshSecrets() { p.Renewals.Refresh() }

func (p *Pusher) reportExpiry(identity string) {
	if p.OnExpiry == nil || identity == "" {
		return
	}
	p.mu.Lock()
	var soonest time.Time
	for _, n := range p.nodes {
		if n.identity == identity && (soonest.IsZero() || n.notAfter.Before(soonest)) {
			soonest = n.notAfter
		}
	}
	p.mu.Unlock()
	p.OnExpiry(identity, soonest)
}

// Certificate is the identity and expiry of the SVID last served to a
// node ("" before one is).
func (p *Pusher) Certificate(nodeID string) (identity string, notAfter time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := p.nodes[nodeID]; n != nil {
		return n.identity, n.notAfter
	}
	return "", time.Time{}
}

// ExplainNACK finds what a node's rejection is about: the resources of
// that type served to it whose names its message contains, and the
// objects they come from in the model last pushed.
func (p *Pusher) ExplainNACK(nodeID, typeURL, message string) (resources []string, objects []model.Ref) {
	_, view, ok := p.Cache.NodeView(nodeID)
	if !ok {
		return nil, nil
	}
	var found []string
	for name := range view[typeURL] {
		if strings.Contains(message, name) {
			found = append(found, name)
		}
	}
	// outbound|80||a.ns.svc.cluster.local also contains outbound|80: keep
	// the longest names only.
	for _, name := range found {
		if !slices.ContainsFunc(found, func(o string) bool { return o != name && strings.Contains(o, name) }) {
			resources = append(resources, name)
		}
	}
	slices.Sort(resources)
	p.mu.Lock()
	mesh := cmp.Or(p.pushed, p.mesh)
	var w *model.Workload
	if n := p.nodes[nodeID]; n != nil && mesh != nil {
		w = mesh.Workload(n.ident.NodeID.Namespace, n.ident.NodeID.Pod)
	}
	p.mu.Unlock()
	for _, name := range resources {
		for _, ref := range translate.Origins(mesh, w, typeURL, name) {
			if !slices.Contains(objects, ref) {
				objects = append(objects, ref)
			}
		}
	}
	return resources, objects
}

// Mesh returns the latest model (nil before the first update).
func (p *Pusher) Mesh() *model.Mesh {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mesh
}

// Disconnect forgets a proxy whose last stream closed.
func (p *Pusher) Disconnect(nodeID string) {
	p.mu.Lock()
	n := p.nodes[nodeID]
	delete(p.nodes, nodeID)
	p.mu.Unlock()
	if n != nil {
		p.Renewals.Stop(nodeID)
		p.reportExpiry(n.identity)
	}
}

// RoundStart is when the first change behind a class's current result happened.
func (p *Pusher) RoundStart(class string) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.classes[class]
	if !ok || c.roundStart.IsZero() {
		return time.Time{}, false
	}
	return c.roundStart, true
}

// debouncer decides when a push round is due, as istiod's debounce() does:
// after Quiet without a new event, and at the latest Max after the first
// event of the round. It is plain state, so tests drive it with any times.
type debouncer struct {
	quiet, max  time.Duration
	first, last time.Time
	pending     bool
}

// add records an event.
func (d *debouncer) add(now time.Time) {
	if !d.pending {
		d.first, d.pending = now, true
	}
	d.last = now
}

// deadline is when the pending round is due.
func (d *debouncer) deadline() time.Time {
	q, m := d.last.Add(d.quiet), d.first.Add(d.max)
	if m.Before(q) {
		return m
	}
	return q
}

// due reports, and consumes, a round that is due at now.
func (d *debouncer) due(now time.Time) bool {
	if d.pending && !now.Before(d.deadline()) {
		d.pending = false
		return true
	}
	return false
}

// Run debounces and pushes until ctx ends, one round at a time.
func (p *Pusher) Run(ctx context.Context) error {
	d := &debouncer{quiet: p.Debounce, max: p.MaxDelay}
	var timer clock.Timer
	var fire <-chan time.Time
	arm := func() {
		if timer != nil {
			timer.Stop()
		}
		timer = p.Clock.NewTimer(d.deadline().Sub(p.Clock.Now()))
		fire = timer.C()
	}
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case <-p.trigger:
			d.add(p.Clock.Now())
			arm()
		case <-fire:
			if d.due(p.Clock.Now()) {
				fire = nil
				p.round(ctx)
			} else if d.pending {
				arm()
			}
		case <-p.kick:
			p.round(ctx)
		}
	}
}

type classJob struct {
	key   string
	w     *model.Workload
	nodes []string
	// current is the class's state when its result was computed from the
	// last round's model (nil otherwise).
	current *classInfo
}

// round computes the classes of all connected proxies from the latest model.
// When the model differs from the last round's in endpoints only, a class
// computed from that model gets just its changed ClusterLoadAssignments,
// computed once per variant for every class and marshalled once; other
// classes are translated in full.
func (p *Pusher) round(ctx context.Context) {
	p.mu.Lock()
	mesh, start, prev := p.mesh, p.firstEvent, p.pushed
	p.firstEvent = time.Time{}
	p.mu.Unlock()
	if mesh == nil {
		return
	}
	// Outside the lock: a walk of both models (only rounds change pushed).
	var eps *endpointRound
	if changed, ok := model.EndpointChanges(prev, mesh); ok && !p.fullRoundsOnly {
		if u, ok := translate.NewEndpointUpdate(prev, mesh, changed); ok {
			eps = &endpointRound{update: u, marshalled: map[*endpointv3.ClusterLoadAssignment]*Resource{}}
		}
	}
	p.mu.Lock()
	jobs := map[string]*classJob{}
	rebind := map[string]string{}
	for nodeID, n := range p.nodes {
		w := mesh.Workload(n.ident.NodeID.Namespace, n.ident.NodeID.Pod)
		if w == nil {
			continue // not in the model (yet): keep serving its last class
		}
		key := n.lastKey
		if key == "" || eps == nil || !eps.update.KeepsClass(w) {
			key = translate.ClassKey(mesh, w)
		}
		n.lastKey = key
		if key != n.class {
			rebind[nodeID] = key
		}
		if jobs[key] == nil {
			jobs[key] = &classJob{key: key, w: w}
			if c := p.classes[key]; c != nil && prev != nil && c.mesh == prev {
				jobs[key].current = c
			}
		}
		jobs[key].nodes = append(jobs[key].nodes, nodeID)
	}
	p.mu.Unlock()
	if !start.IsZero() {
		p.Metrics.Debounce.Observe(p.Clock.Since(start).Seconds())
	}

	type result struct {
		class    Class
		problems []model.Problem
		err      error
		// endpoints, for a class updated in place: its changed
		// ClusterLoadAssignments (possibly none).
		endpoints map[string]*Resource
		inPlace   bool
	}
	results := make(map[string]*result, len(jobs))
	var rmu sync.Mutex
	g, _ := errgroup.WithContext(ctx)
	limit := p.Concurrency
	if limit <= 0 {
		limit = runtime.NumCPU()
	}
	g.SetLimit(limit)
	for _, j := range jobs {
		g.Go(func() error {
			var r *result
			if eps != nil && j.current != nil && p.Cache.HasClass(j.key) {
				r = &result{problems: j.current.problems, inPlace: true}
				r.endpoints, r.err = eps.forClass(j.w, func(name string) (*Resource, bool) { return p.Cache.Resource(j.key, resource.EndpointType, name) })
			} else {
				t0 := p.Clock.Now()
				res, problems := translate.ForWorkload(mesh, j.w)
				r = &result{problems: problems}
				if err := res.Validate(); err != nil {
					r.err = fmt.Errorf("invalid resources: %w", err)
				} else if err := translate.CheckReferences(res); err != nil {
					r.err = fmt.Errorf("dangling references: %w", err)
				} else {
					r.class, r.err = ClassFrom(res)
				}
				p.Metrics.Translate.Observe(p.Clock.Since(t0).Seconds())
			}
			rmu.Lock()
			results[j.key] = r
			rmu.Unlock()
			return nil
		})
	}
	_ = g.Wait()

	// Before the classes: setting them answers the watches whose on-demand
	// resources changed with this round's model.
	p.Cache.SetOnDemand(p.onDemand(mesh))
	var problems []model.Problem
	served := map[string]*classInfo{}
	intern := map[[3]string]*Resource{}
	for key, r := range results {
		problems = append(problems, r.problems...)
		if r.err != nil {
			// Keep the last good result; the proxies stay on it.
			p.Metrics.TranslateErrors.Inc()
			p.Log.Error(r.err, "translation result rejected; proxies keep their last good configuration", "class", key)
			continue
		}
		info := &classInfo{roundStart: start, mesh: mesh, problems: r.problems}
		switch {
		case !r.inPlace:
			// Classes share the resources that come out the same (a
			// Service's cluster is the same bytes for most classes that see
			// it): one copy in memory.
			for typeURL, rs := range r.class {
				for name, res := range rs {
					k := [3]string{typeURL, name, res.Version}
					if x, ok := intern[k]; ok {
						rs[name] = x
					} else {
						intern[k] = res
					}
				}
			}
			p.Cache.SetClass(key, r.class)
			p.Metrics.ClassUpdates.WithLabelValues("full").Inc()
		case len(r.endpoints) > 0:
			p.Cache.UpdateResources(key, resource.EndpointType, r.endpoints)
			p.Metrics.ClassUpdates.WithLabelValues("endpoints").Inc()
		default:
			// Nothing it holds changed: its result is current as it is.
			info.roundStart = jobs[key].current.roundStart
		}
		served[key] = info
	}
	p.mu.Lock()
	maps.Copy(p.classes, served)
	var bind [][2]string
	for nodeID, key := range rebind {
		n := p.nodes[nodeID]
		if n == nil {
			continue
		}
		if _, ok := p.classes[key]; ok {
			n.class = key
			bind = append(bind, [2]string{nodeID, key})
		}
	}
	// Classes no connected proxy uses any more are dropped.
	used := map[string]bool{}
	for _, n := range p.nodes {
		used[n.class] = true
	}
	var drop []string
	for key := range p.classes {
		if !used[key] {
			delete(p.classes, key)
			drop = append(drop, key)
		}
	}
	p.pushed = mesh
	p.mu.Unlock()
	for _, b := range bind {
		p.Cache.BindNode(b[0], b[1])
	}
	for _, key := range drop {
		p.Cache.DeleteClass(key)
	}
	if p.OnProblems != nil {
		p.OnProblems(problems)
	}
	p.Metrics.Rounds.Inc()
}

// endpointRound is a round's endpoint-only update: each changed
// ClusterLoadAssignment is validated and marshalled once, whatever number
// of classes holds it.
type endpointRound struct {
	update     *translate.EndpointUpdate
	mu         sync.Mutex
	marshalled map[*endpointv3.ClusterLoadAssignment]*Resource
}

// forClass returns the class's changed ClusterLoadAssignments: those whose
// content differs from what it holds.
func (e *endpointRound) forClass(w *model.Workload, held func(name string) (*Resource, bool)) (map[string]*Resource, error) {
	out := map[string]*Resource{}
	for _, cla := range e.update.For(w, func(name string) bool { _, ok := held(name); return ok }) {
		e.mu.Lock()
		r, ok := e.marshalled[cla]
		if !ok {
			err := cla.ValidateAll()
			if err == nil {
				r, err = NewResource(cla.ClusterName, cla)
			}
			if err != nil {
				e.mu.Unlock()
				return nil, fmt.Errorf("invalid ClusterLoadAssignment %s: %w", cla.ClusterName, err)
			}
			e.marshalled[cla] = r
		}
		e.mu.Unlock()
		if h, _ := held(r.Name); h == nil || h.Version != r.Version {
			out[r.Name] = r
		}
	}
	return out, nil
}

// onDemand resolves the on-demand names proxies subscribe to (pod-IP
// clusters) from a round's model, each name once per round.
func (p *Pusher) onDemand(mesh *model.Mesh) OnDemand {
	var mu sync.Mutex
	memo := map[string]*Resource{}
	return func(typeURL, name string) (*Resource, bool) {
		if typeURL != resource.ClusterType || !strings.HasPrefix(name, translate.PodIPClusterPrefix) {
			return nil, false
		}
		mu.Lock()
		defer mu.Unlock()
		if r, ok := memo[name]; ok {
			return r, true
		}
		var r *Resource
		if c, ok := translate.PodIPCluster(mesh, name); ok {
			var err error
			if err = c.ValidateAll(); err == nil {
				r, err = NewResource(name, c)
			}
			if err != nil {
				p.Log.Error(err, "on-demand cluster not served", "cluster", name)
				r = nil
			}
		}
		memo[name] = r
		p.Metrics.OnDemandClusters.WithLabelValues(strconv.FormatBool(r != nil)).Inc()
		return r, true
	}
}

// ClassFrom marshals a translation result into a cache class.
func ClassFrom(res *translate.Resources) (Class, error) {
	c := Class{resource.ListenerType: {}, resource.RouteType: {}, resource.ClusterType: {}, resource.EndpointType: {}}
	add := func(typeURL, name string, r *Resource, err error) error {
		if err != nil {
			return fmt.Errorf("marshal %s %s: %w", typeURL, name, err)
		}
		c[typeURL][name] = r
		return nil
	}
	for _, l := range res.Listeners {
		r, err := NewResource(l.Name, l)
		if err := add(resource.ListenerType, l.Name, r, err); err != nil {
			return nil, err
		}
	}
	for _, rc := range res.Routes {
		r, err := NewResource(rc.Name, rc)
		if err := add(resource.RouteType, rc.Name, r, err); err != nil {
			return nil, err
		}
	}
	for _, cl := range res.Clusters {
		r, err := NewResource(cl.Name, cl)
		if err := add(resource.ClusterType, cl.Name, r, err); err != nil {
			return nil, err
		}
	}
	for _, e := range res.Endpoints {
		r, err := NewResource(e.ClusterName, e)
		if err := add(resource.EndpointType, e.ClusterName, r, err); err != nil {
			return nil, err
		}
	}
	return c, nil
}
