package controlplane_test

import (
	"context"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trellis-mesh/trellis/pkg/ca"
)

func TestRootSecretIsCreatedOnceByConcurrentReplicas(t *testing.T) {
	ns := env.Namespace(t, nil)
	clk := clocktesting.NewFakeClock(time.Now())
	const replicas = 4
	roots := make([]*ca.Authority, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := ca.LoadOrCreate(context.Background(), env.Client, ns, ca.RootSecretName, "cluster.local", clk)
			if err != nil {
				t.Error(err)
				return
			}
			roots[i] = a
		}()
	}
	wg.Wait()
	for i := 1; i < replicas; i++ {
		if roots[i] == nil || roots[0] == nil || !roots[i].Root().Equal(roots[0].Root()) {
			t.Fatalf("replica %d uses a different root", i)
		}
	}
	// A restart loads the same root.
	again, err := ca.LoadOrCreate(context.Background(), env.Client, ns, ca.RootSecretName, "cluster.local", clk)
	if err != nil || !again.Root().Equal(roots[0].Root()) {
		t.Fatalf("restart: %v", err)
	}
}
