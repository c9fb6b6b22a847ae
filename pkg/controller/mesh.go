package controller

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// ControllerName is written into Gateway API route parent statuses.
const ControllerName = "trellis.dev/mesh-controller"

// meshKey is the single work item: any change rebuilds the whole model
// (Build takes ~25 ms for 5,000 Services) and the queue coalesces bursts.
var meshKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "mesh"}}

// statusKey only rewrites status (the translator's problems changed); it
// does not push, or a push would wake it again.
var statusKey = reconcile.Request{NamespacedName: types.NamespacedName{Name: "status"}}

// Pusher receives every new model.
type Pusher interface {
	Update(mesh *model.Mesh)
}

// MeshReconciler keeps the mesh model current and writes status.
type MeshReconciler struct {
	Client client.Client
	Pusher Pusher
	// IsLeader says whether this replica writes status.
	IsLeader func() bool
	// PodCIDRs are the pod networks (--pod-cidrs); empty: the Nodes'
	// spec.podCIDRs.
	PodCIDRs []netip.Prefix

	// lastGood keeps each route's and BackendPolicy's last valid
	// generation in force while a newer one is invalid.
	lastGood model.LastGood
	// trustDomain is the trust domain in force since a MeshConfig first
	// named one (model.Input.ServingTrustDomain); in memory only.
	trustDomain string

	mu                 sync.Mutex
	translatorProblems []model.Problem
	// rejections are the objects whose configuration proxies connected
	// to this replica reject (SetRejections).
	rejections []model.Problem
	// caProblems are the certificate authority's (SetCAProblems).
	caProblems []model.Problem
	// loggedProblems are the problems already logged (each once, when it
	// appears; again only after it went away and came back).
	loggedProblems map[string]bool
	wake           chan event.GenericEvent
	// gatewayKinds are the Gateway API route kinds the cluster serves,
	// found at setup; nil means all of them.
	gatewayKinds map[string]bool
}

// gatewayAPIKinds are the Gateway API kinds the mesh reads.
var gatewayAPIKinds = []string{"HTTPRoute", "GRPCRoute", "ReferenceGrant"}

// GatewayAPIKinds finds which of the Gateway API kinds the mesh reads the
// cluster serves, and which it does not.
func GatewayAPIKinds(mapper meta.RESTMapper) (served map[string]bool, missing []string, err error) {
	served = map[string]bool{}
	for _, k := range gatewayAPIKinds {
		_, err := mapper.RESTMapping(schema.GroupKind{Group: gwv1.GroupName, Kind: k}, gwv1.GroupVersion.Version)
		switch {
		case err == nil:
			served[k] = true
		case meta.IsNoMatchError(err):
			missing = append(missing, k)
		default:
			return nil, nil, fmt.Errorf("look up Gateway API kind %s: %w", k, err)
		}
	}
	return served, missing, nil
}

// serves says whether the cluster has the Gateway API kind.
func (r *MeshReconciler) serves(kind string) bool {
	return r.gatewayKinds == nil || r.gatewayKinds[kind]
}

// SetTranslatorProblems records the problems the last push round found and
// schedules a status update.
func (r *MeshReconciler) SetTranslatorProblems(ps []model.Problem) {
	r.setProblems(&r.translatorProblems, ps)
}

// SetRejections records the objects whose configuration proxies reject
// (Programmed=False, RejectedByProxy, until they accept a later version)
// and schedules a status update. Only the proxies of this replica count:
// with several replicas, the leader reports those connected to it.
func (r *MeshReconciler) SetRejections(ps []model.Problem) { r.setProblems(&r.rejections, ps) }

// SetCAProblems records what the certificate authority reports on objects
// (CARootMissing on MeshConfig) and schedules a status update.
func (r *MeshReconciler) SetCAProblems(ps []model.Problem) { r.setProblems(&r.caProblems, ps) }

func (r *MeshReconciler) setProblems(into *[]model.Problem, ps []model.Problem) {
	r.mu.Lock()
	same := slices.Equal(*into, ps)
	*into = ps
	r.mu.Unlock()
	if !same {
		r.WakeStatus()
	}
}

// WakeStatus schedules a status update (a replica just elected leader
// writes what it knows at once, not at the next change).
func (r *MeshReconciler) WakeStatus() {
	select {
	case r.wake <- event.GenericEvent{Object: &corev1.Namespace{}}:
	default:
	}
}

// SetupWithManager registers the controller. It does not need leader
// election: every replica serves xDS from its own model.
func (r *MeshReconciler) SetupWithManager(mgr ctrl.Manager) error {
	r.wake = make(chan event.GenericEvent, 1)
	all := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request { return []reconcile.Request{meshKey} })
	status := handler.EnqueueRequestsFromMapFunc(func(context.Context, client.Object) []reconcile.Request { return []reconcile.Request{statusKey} })
	// Our own status writes must not trigger a rebuild: only spec changes
	// (generation) of the kinds whose status we write count.
	spec := builder.WithPredicates(predicate.GenerationChangedPredicate{})
	// The Gateway API CRDs are optional: without them the mesh runs on
	// Services and the Trellis policies alone (a watch on a missing kind
	// would keep the controller from ever starting).
	var missing []string
	var err error
	if r.gatewayKinds, missing, err = GatewayAPIKinds(mgr.GetRESTMapper()); err != nil {
		return err
	}
	if len(missing) > 0 {
		mgr.GetLogger().Info("Gateway API CRDs not installed: these route kinds are not read; install the standard-channel CRDs and restart the controller", "missing", missing)
	}
	b := ctrl.NewControllerManagedBy(mgr).
		Named("mesh").
		WithOptions(controller.Options{NeedLeaderElection: ptr.To(false), MaxConcurrentReconciles: 1}).
		Watches(&corev1.Service{}, all).
		Watches(&discoveryv1.EndpointSlice{}, all).
		Watches(&corev1.Pod{}, all).
		Watches(&meshv1alpha1.MeshConfig{}, all, spec).
		// Nodes only for their pod CIDRs (status heartbeats do not count).
		Watches(&corev1.Node{}, all, builder.WithPredicates(podCIDRsChanged)).
		// Namespaces and ServiceAccounts (metadata only) for AccessPolicy
		// sources that name none that exists: only creation and deletion count.
		Watches(&corev1.Namespace{}, all, builder.WithPredicates(createdOrDeleted)).
		WatchesMetadata(&corev1.ServiceAccount{}, all, builder.WithPredicates(createdOrDeleted)).
		Watches(&meshv1alpha1.AccessPolicy{}, all, spec).
		Watches(&meshv1alpha1.BackendPolicy{}, all, spec).
		Watches(&meshv1alpha1.ExternalService{}, all, spec)
	if r.serves("HTTPRoute") {
		b = b.Watches(&gwv1.HTTPRoute{}, all, spec)
	}
	if r.serves("GRPCRoute") {
		b = b.Watches(&gwv1.GRPCRoute{}, all, spec)
	}
	if r.serves("ReferenceGrant") {
		b = b.Watches(&gwv1.ReferenceGrant{}, all)
	}
	return b.WatchesRawSource(source.Channel(r.wake, status)).Complete(r)
}

// The permissions below are what the controller uses; README "Why each
// permission" explains them.
// +kubebuilder:rbac:groups="",resources=services;pods,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=list;watch
// +kubebuilder:rbac:groups="",resources=serviceaccounts,verbs=list;watch
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch
// +kubebuilder:rbac:groups=mesh.trellis.dev,resources=meshconfigs;accesspolicies;backendpolicies;externalservices,verbs=get;list;watch
// +kubebuilder:rbac:groups=mesh.trellis.dev,resources=meshconfigs/status;accesspolicies/status;backendpolicies/status;externalservices/status,verbs=update;patch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=httproutes;grpcroutes;referencegrants,verbs=get;list;watch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=httproutes/status;grpcroutes/status,verbs=update;patch
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create
// Leader election: the Lease and its events live in the control plane's
// namespace (the chart templates the namespace).
// +kubebuilder:rbac:groups=coordination.k8s.io,namespace=trellis-system,resources=leases,verbs=get;create;update
// +kubebuilder:rbac:groups="",namespace=trellis-system,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups="",namespace=trellis-system,resources=secrets,verbs=get;create
// +kubebuilder:rbac:groups=cert-manager.io,namespace=trellis-system,resources=certificaterequests,verbs=get;create;delete

// Reconcile rebuilds the model, hands it to the pusher and, on the leader,
// writes status.
func (r *MeshReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	logger := log.FromContext(ctx)
	in, err := r.input(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	if r.trustDomain == "" && in.MeshConfig != nil {
		// A restarted controller: the trust domain in force is recorded
		// in MeshConfig's status (a re-created MeshConfig carries it on).
		r.trustDomain = in.MeshConfig.Status.TrustDomain
	}
	in.ServingTrustDomain = r.trustDomain
	mesh, problems := r.lastGood.Build(in)
	if r.trustDomain == "" && in.MeshConfig != nil {
		r.trustDomain = mesh.Config.TrustDomain
	}
	if req != statusKey {
		r.Pusher.Update(mesh)
	}
	logger.V(4).Info("model rebuilt", "services", len(mesh.Services), "workloads", len(mesh.Workloads), "problems", len(problems))
	if r.IsLeader != nil && !r.IsLeader() {
		return reconcile.Result{}, nil
	}
	r.mu.Lock()
	problems = append(problems, r.translatorProblems...)
	problems = append(problems, r.rejections...)
	problems = append(problems, r.caProblems...)
	r.mu.Unlock()
	return reconcile.Result{}, r.writeStatus(ctx, in, problems)
}

func (r *MeshReconciler) input(ctx context.Context) (model.Input, error) {
	return ListInput(ctx, r.Client, r.serves, r.PodCIDRs)
}

// ListInput lists what the mesh model is built from, as the controller
// reads it (trellisctl analyze --live reads the same): serves says which
// Gateway API kinds the cluster has; podCIDRs, when set, replace the
// Nodes' spec.podCIDRs.
func ListInput(ctx context.Context, c client.Reader, serves func(kind string) bool, podCIDRs []netip.Prefix) (model.Input, error) {
	var (
		in     model.Input
		mcs    meshv1alpha1.MeshConfigList
		svcs   corev1.ServiceList
		eps    discoveryv1.EndpointSliceList
		pods   corev1.PodList
		nodes  corev1.NodeList
		nss    corev1.NamespaceList
		aps    meshv1alpha1.AccessPolicyList
		bps    meshv1alpha1.BackendPolicyList
		ess    meshv1alpha1.ExternalServiceList
		hrs    gwv1.HTTPRouteList
		grs    gwv1.GRPCRouteList
		rgs    gwv1.ReferenceGrantList
		sas    = &metav1.PartialObjectMetadataList{}
		lists  = []client.ObjectList{&mcs, &svcs, &eps, &pods, &nss, sas, &aps, &bps, &ess}
		byKind = map[string]client.ObjectList{"HTTPRoute": &hrs, "GRPCRoute": &grs, "ReferenceGrant": &rgs}
	)
	// ServiceAccounts: metadata only (names are all the model needs).
	sas.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("ServiceAccountList"))
	if len(podCIDRs) == 0 {
		lists = append(lists, &nodes)
	}
	for _, k := range gatewayAPIKinds {
		if serves(k) {
			lists = append(lists, byKind[k])
		}
	}
	for _, l := range lists {
		if err := c.List(ctx, l); err != nil {
			return in, err
		}
	}
	for i := range mcs.Items {
		if mcs.Items[i].Name == meshv1alpha1.MeshConfigName {
			in.MeshConfig = &mcs.Items[i]
		}
	}
	in.Services, in.EndpointSlices, in.Pods = ptrs(svcs.Items), ptrs(eps.Items), ptrs(pods.Items)
	for _, p := range podCIDRs {
		in.PodCIDRs = append(in.PodCIDRs, p.String())
	}
	for _, n := range nodes.Items {
		in.PodCIDRs = append(in.PodCIDRs, n.Spec.PodCIDRs...)
	}
	for _, n := range nss.Items {
		if n.DeletionTimestamp == nil {
			in.Namespaces = append(in.Namespaces, n.Name)
		}
	}
	for _, sa := range sas.Items {
		in.ServiceAccounts = append(in.ServiceAccounts, sa.Namespace+"/"+sa.Name)
	}
	in.IdentitiesKnown = true
	in.AccessPolicies, in.BackendPolicies, in.ExternalServices = ptrs(aps.Items), ptrs(bps.Items), ptrs(ess.Items)
	in.HTTPRoutes, in.GRPCRoutes, in.ReferenceGrants = ptrs(hrs.Items), ptrs(grs.Items), ptrs(rgs.Items)
	return in, nil
}

// podCIDRsChanged passes Node events that can change the pod networks.
var podCIDRsChanged = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*corev1.Node)
		n, ok2 := e.ObjectNew.(*corev1.Node)
		return !ok1 || !ok2 || !slices.Equal(o.Spec.PodCIDRs, n.Spec.PodCIDRs)
	},
}

// createdOrDeleted passes creations and deletions only.
var createdOrDeleted = predicate.Funcs{
	UpdateFunc:  func(event.UpdateEvent) bool { return false },
	GenericFunc: func(event.GenericEvent) bool { return false },
}

// NodePodCIDRsOnly is the cache transform for Nodes: only the name and the
// pod CIDRs are kept (a Node's status with its images is large and
// changes often).
func NodePodCIDRsOnly(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	return &corev1.Node{
		TypeMeta:   n.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}, nil
}

func ptrs[T any](items []T) []*T {
	out := make([]*T, len(items))
	for i := range items {
		out[i] = &items[i]
	}
	return out
}
