package controlplane_test

import (
	"context"
	"net"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

// TestLeaderElectionSurvivesALostLease runs two replicas with leader
// election against a real apiserver. One leads; when another holder takes
// the Lease (as when the leader could not renew it while the apiserver was
// away), the leader stops leading but keeps running — its xDS server and
// manager stay up — and once that holder's Lease expires a replica leads
// again. Stopping the leader hands the Lease over at once (released).
func TestLeaderElectionSurvivesALostLease(t *testing.T) {
	const ns = "leader-election"
	replica := func(id string) *plane {
		return startPlane(t, nil, func(o *controlplane.Options) {
			o.LeaderElect, o.LeaderIdentity, o.Namespace = true, id, ns
			o.LeaseDuration, o.RenewDeadline, o.RetryPeriod = 2*time.Second, 1500*time.Millisecond, 200*time.Millisecond
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			o.WebhookPort = l.Addr().(*net.TCPAddr).Port
			l.Close()
		})
	}
	holder := func() string {
		var l coordinationv1.Lease
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: controlplane.LeaseName}, &l); err != nil {
			return ""
		}
		return ptr.Deref(l.Spec.HolderIdentity, "")
	}
	until := func(what string, f func() bool) {
		t.Helper()
		deadline := time.Now().Add(wait)
		for !f() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s (Lease holder %q)", what, wait, holder())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	a := replica("replica-a")
	until("replica-a leads", func() bool { return a.IsLeader() && holder() == "replica-a" })
	b := replica("replica-b")
	time.Sleep(time.Second)
	if b.IsLeader() {
		t.Fatal("both replicas lead")
	}

	// Another holder takes the Lease for 3 s.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error { // the leader renews every 200 ms
		var l coordinationv1.Lease
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: controlplane.LeaseName}, &l); err != nil {
			return err
		}
		l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds = ptr.To("intruder"), ptr.To[int32](3)
		l.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
		return env.Client.Update(context.Background(), &l)
	}); err != nil {
		t.Fatal(err)
	}
	until("replica-a stops leading", func() bool { return !a.IsLeader() })
	until("a replica leads again after the other holder's Lease expired", func() bool {
		h := holder()
		return (h == "replica-a" && a.IsLeader()) || (h == "replica-b" && b.IsLeader())
	})
	if a.IsLeader() && b.IsLeader() {
		t.Fatal("both replicas lead")
	}
	// Both replicas kept running: their xDS servers still accept connections.
	for name, p := range map[string]*plane{"replica-a": a, "replica-b": b} {
		c, err := net.Dial("tcp", p.XDSAddr)
		if err != nil {
			t.Fatalf("%s stopped serving xDS after the Lease was lost: %v", name, err)
		}
		c.Close()
	}
	// The leader stops: the other takes over without waiting for expiry.
	leader, other, otherID := a, b, "replica-b"
	if b.IsLeader() {
		leader, other, otherID = b, a, "replica-a"
	}
	leader.stop()
	until(otherID+" leads after the leader stopped", func() bool { return other.IsLeader() && holder() == otherID })
}
