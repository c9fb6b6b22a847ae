package controller

import (
	"bytes"
	"context"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

const (
	// RootCAConfigMap is published in every meshed namespace: the trust
	// bundle the sidecar uses to verify the xDS server (and workloads their peers).
	RootCAConfigMap = "trellis-root-ca"
	// RootCAKey is its data key.
	RootCAKey = "root-cert.pem"
	// InjectLabel marks meshed namespaces.
	InjectLabel = "trellis.dev/inject"
)

// RootCAReconciler keeps the trellis-root-ca ConfigMap in every namespace
// labelled trellis.dev/inject=enabled, and in the control plane's own
// (trellisctl verifies the metrics endpoint's certificate with it). It runs
// on the leader only (IsLeader). The controller may read, list and watch only
// ConfigMaps of that name.
type RootCAReconciler struct {
	// Namespace is the control plane's own namespace ("": none).
	Namespace string
	Client    client.Client
	// Reader reads ConfigMaps directly from the apiserver.
	Reader client.Reader
	// Bundle returns the current trust bundle (PEM).
	Bundle func(ctx context.Context) ([]byte, error)
	// Wake, when set, re-publishes the bundle in every meshed namespace
	// (send after the bundle changed, or on becoming leader).
	Wake chan event.GenericEvent
	// IsLeader, when set, says whether this replica writes (the
	// controller runs on every replica; only the leader writes).
	IsLeader func() bool
}

// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=configmaps,verbs=create
// +kubebuilder:rbac:groups="",resources=configmaps,resourceNames=trellis-root-ca,verbs=get;update;list;watch

// Reconcile ensures the ConfigMap of one namespace.
func (r *RootCAReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	if r.IsLeader != nil && !r.IsLeader() {
		return reconcile.Result{}, nil
	}
	var ns corev1.Namespace
	if err := r.Client.Get(ctx, client.ObjectKey{Name: req.Name}, &ns); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if (ns.Labels[InjectLabel] != "enabled" && ns.Name != r.Namespace) || ns.DeletionTimestamp != nil {
		return reconcile.Result{}, nil
	}
	bundle, err := r.Bundle(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	var cm corev1.ConfigMap
	err = r.Reader.Get(ctx, client.ObjectKey{Namespace: ns.Name, Name: RootCAConfigMap}, &cm)
	if apierrors.IsNotFound(err) {
		cm = corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns.Name, Name: RootCAConfigMap, Labels: map[string]string{"app.kubernetes.io/managed-by": "trellis"}},
			Data:       map[string]string{RootCAKey: string(bundle)},
		}
		err := r.Client.Create(ctx, &cm)
		if apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause) {
			return reconcile.Result{}, nil // deleted since the cache saw it
		}
		return reconcile.Result{}, client.IgnoreAlreadyExists(err)
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	if bytes.Equal([]byte(cm.Data[RootCAKey]), bundle) {
		return reconcile.Result{}, nil
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[RootCAKey] = string(bundle)
	return reconcile.Result{}, r.Client.Update(ctx, &cm)
}

// SetupWithManager watches Namespaces with the inject label, and the
// trellis-root-ca ConfigMaps: one deleted or edited is put back at once. The
// manager's cache must restrict ConfigMaps to that name (the controller may
// list and watch no others).
func (r *RootCAReconciler) SetupWithManager(mgr ctrl.Manager) error {
	labelled := predicate.NewPredicateFuncs(func(o client.Object) bool {
		return o.GetLabels()[InjectLabel] == "enabled" || (r.Namespace != "" && o.GetName() == r.Namespace)
	})
	b := ctrl.NewControllerManagedBy(mgr).
		Named("rootca").
		WithOptions(controller.Options{NeedLeaderElection: ptr.To(r.IsLeader == nil)}).
		For(&corev1.Namespace{}, builder.WithPredicates(labelled)).
		Watches(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			if o.GetName() != RootCAConfigMap {
				return nil
			}
			return []reconcile.Request{{NamespacedName: client.ObjectKey{Name: o.GetNamespace()}}}
		}))
	if r.Wake != nil {
		b = b.WatchesRawSource(source.Channel(r.Wake, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, _ client.Object) []reconcile.Request {
			var nss corev1.NamespaceList
			if err := r.Client.List(ctx, &nss, client.MatchingLabels{InjectLabel: "enabled"}); err != nil {
				return nil
			}
			out := make([]reconcile.Request, 0, len(nss.Items)+1)
			for _, ns := range nss.Items {
				out = append(out, reconcile.Request{NamespacedName: client.ObjectKey{Name: ns.Name}})
			}
			if r.Namespace != "" {
				out = append(out, reconcile.Request{NamespacedName: client.ObjectKey{Name: r.Namespace}})
			}
			return out
		})))
	}
	return b.Complete(r)
}
