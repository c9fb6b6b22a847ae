package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeaseName is the leader election Lease in the control plane's namespace.
const LeaseName = "trellis-controller.mesh.trellis.dev"

// leadership is the leader-only work of a replica — status writes, the
// webhooks' caBundle, root rotation steps, the trust-bundle ConfigMaps —
// run while it holds the Lease. Unlike controller-runtime's manager-wide
// election, which exits the process when the Lease is lost, a replica that
// cannot renew (the apiserver or etcd away for longer than RenewDeadline)
// stops only that work, keeps serving xDS and the webhooks from what it
// knows, and campaigns again: an apiserver outage does not restart every
// replica and reconnect every proxy.
type leadership struct {
	leading atomic.Bool
	// tasks run while leading, each until its context ends.
	tasks []func(context.Context) error
	// elected run each time this replica becomes leader.
	elected []func()
}

// IsLeader says whether this replica does the leader-only work now.
func (cp *ControlPlane) IsLeader() bool { return !cp.opts.LeaderElect || cp.leader.leading.Load() }

// leaderTask adds work that runs on the leader only.
func (cp *ControlPlane) leaderTask(f func(context.Context) error) error {
	if !cp.opts.LeaderElect {
		return add(cp.Manager, everyReplica(f))
	}
	cp.leader.tasks = append(cp.leader.tasks, f)
	return nil
}

// onElected adds what runs each time this replica becomes leader (and once
// at start without leader election).
func (cp *ControlPlane) onElected(f func()) error {
	if !cp.opts.LeaderElect {
		return add(cp.Manager, everyReplica(func(ctx context.Context) error { f(); <-ctx.Done(); return nil }))
	}
	cp.leader.elected = append(cp.leader.elected, f)
	return nil
}

// leaderIdentity is the Lease holder's name: the pod's (env POD_NAME, the
// chart sets it), else the host's with a random suffix.
func leaderIdentity() (string, error) {
	if n := os.Getenv("POD_NAME"); n != "" {
		return n, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", err
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return h + "_" + hex.EncodeToString(b), nil
}

// campaign runs on every replica: it takes the Lease when it is free or
// expired, runs the leader's work while renewing it, and after losing it
// campaigns again until ctx ends (then a held Lease is released, so a
// rolling restart hands over at once).
func (cp *ControlPlane) campaign(cfg *rest.Config) (func(context.Context) error, error) {
	o := cp.opts
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	id := o.LeaderIdentity
	if id == "" {
		if id, err = leaderIdentity(); err != nil {
			return nil, err
		}
	}
	log := o.Log.WithName("leader-election").WithValues("identity", id)
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: o.leaseNamespace(), Name: LeaseName},
		Client:     cs.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: id},
	}
	lc := leaderelection.LeaderElectionConfig{
		Lock: lock, Name: LeaseName, ReleaseOnCancel: true,
		LeaseDuration: o.LeaseDuration, RenewDeadline: o.RenewDeadline, RetryPeriod: o.RetryPeriod,
	}
	// NewLeaderElector checks the timings; fail at start, not at Run.
	if _, err := leaderelection.NewLeaderElector(withCallbacks(lc, leaderelection.LeaderCallbacks{OnStartedLeading: func(context.Context) {}, OnStoppedLeading: func() {}})); err != nil {
		return nil, fmt.Errorf("leader election: %w", err)
	}
	return func(ctx context.Context) error {
		for ctx.Err() == nil {
			var running sync.WaitGroup
			le, err := leaderelection.NewLeaderElector(withCallbacks(lc, leaderelection.LeaderCallbacks{
				OnStartedLeading: func(lctx context.Context) {
					cp.leader.leading.Store(true)
					log.Info("became leader: writing status, the webhooks' caBundle and trust bundles, driving root rotation")
					for _, f := range cp.leader.elected {
						f()
					}
					for _, t := range cp.leader.tasks {
						running.Go(func() { _ = t(lctx) })
					}
				},
				OnStoppedLeading: func() {
					if cp.leader.leading.Swap(false) && ctx.Err() == nil {
						log.Info("lost the leader election Lease (not renewed within the renew deadline): still serving xDS and the webhooks; campaigning again")
					}
				},
			}))
			if err != nil {
				return err
			}
			le.Run(ctx)
			running.Wait()
		}
		return nil
	}, nil
}

func withCallbacks(lc leaderelection.LeaderElectionConfig, cb leaderelection.LeaderCallbacks) leaderelection.LeaderElectionConfig {
	lc.Callbacks = cb
	return lc
}

func (o Options) leaseNamespace() string {
	if o.LeaderElectionNamespace != "" {
		return o.LeaderElectionNamespace
	}
	return o.Namespace
}
