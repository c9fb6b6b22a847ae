package ca_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trellis-mesh/trellis/pkg/ca"
)

func TestIssueRetryDelay(t *testing.T) {
	want := []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 2 * time.Minute, 2 * time.Minute}
	for i, w := range want {
		if got := ca.IssueRetryDelay(i + 1); got != w {
			t.Errorf("IssueRetryDelay(%d) = %s; want %s", i+1, got, w)
		}
	}
}

// waitFor polls cond (Renewals runs issuances in goroutines).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestRenewalsUnderAFakeClock: a failing issuance is retried after the
// back-off, a hung one is cancelled at Timeout, a served one is renewed at
// its RotateAt, and after Stop nothing runs again.
func TestRenewalsUnderAFakeClock(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	var mu sync.Mutex
	var calls, served, failures int
	var lastErr error
	mode := "fail" // fail, hang, ok
	r := &ca.Renewals{Clock: clk, Timeout: 30 * time.Second, OnFailure: func(_ string, err error, _ time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		failures++
		lastErr = err
	}}
	get := func() (int, int, int) {
		mu.Lock()
		defer mu.Unlock()
		return calls, served, failures
	}
	r.Start("node", func(ctx context.Context) (ca.Issuance, error) {
		mu.Lock()
		calls++
		m := mode
		mu.Unlock()
		switch m {
		case "fail":
			return ca.Issuance{}, errors.New("backend down")
		case "hang":
			<-ctx.Done()
			return ca.Issuance{}, context.Cause(ctx)
		}
		return ca.Issuance{RotateAt: clk.Now().Add(time.Hour), Serve: func() { mu.Lock(); served++; mu.Unlock() }}, nil
	})
	waitFor(t, "the first failure", func() bool { _, _, f := get(); return f == 1 })
	clk.Step(9 * time.Second)
	time.Sleep(20 * time.Millisecond)
	if c, _, _ := get(); c != 1 {
		t.Fatalf("retried before the 10 s back-off (%d calls)", c)
	}
	mu.Lock()
	mode = "hang"
	mu.Unlock()
	clk.Step(time.Second)
	waitFor(t, "the retry", func() bool { c, _, _ := get(); return c == 2 })
	waitFor(t, "the deadline timer", func() bool { return clk.HasWaiters() })
	clk.Step(30 * time.Second)
	waitFor(t, "the hung issuance to fail at Timeout", func() bool { _, _, f := get(); return f == 2 })
	mu.Lock()
	if lastErr == nil || lastErr.Error() != "no certificate within 30s" {
		t.Errorf("hung issuance failed with %v; want the deadline's cause", lastErr)
	}
	mode = "ok"
	mu.Unlock()
	clk.Step(20 * time.Second) // the second back-off
	waitFor(t, "the certificate to be served", func() bool { _, s, _ := get(); return s == 1 })
	clk.Step(time.Hour)
	waitFor(t, "the renewal at RotateAt", func() bool { _, s, _ := get(); return s == 2 })

	r.Stop("node")
	c, _, _ := get()
	clk.Step(2 * time.Hour)
	time.Sleep(20 * time.Millisecond)
	if c2, _, _ := get(); c2 != c {
		t.Errorf("issued after Stop (%d calls, %d before)", c2, c)
	}
}

// TestRenewalsServeOnlyTheLatest: of two overlapping issuances (a renewal
// and a Refresh) the one started last is served even when the other
// finishes after it.
func TestRenewalsServeOnlyTheLatest(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	r := &ca.Renewals{Clock: clk}
	release := make(chan struct{})
	var mu sync.Mutex
	var n int
	var served []int
	r.Start("node", func(ctx context.Context) (ca.Issuance, error) {
		mu.Lock()
		n++
		me := n
		mu.Unlock()
		if me == 1 {
			<-release // the first issuance is slow
		}
		return ca.Issuance{RotateAt: clk.Now().Add(time.Hour), Serve: func() { mu.Lock(); served = append(served, me); mu.Unlock() }}, nil
	})
	waitFor(t, "the first issuance", func() bool { mu.Lock(); defer mu.Unlock(); return n == 1 })
	r.Refresh()
	waitFor(t, "the refresh to be served", func() bool { mu.Lock(); defer mu.Unlock(); return len(served) == 1 })
	close(release)
	time.Sleep(50 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if len(served) != 1 || served[0] != 2 {
		t.Errorf("served %v; want only the refresh (2)", served)
	}
}

// TestServingCertificateRenewedAtHalfLife: a serving certificate issued
// before the listeners start is replaced when half its lifetime has
// passed on the clock, not before.
func TestServingCertificateRenewedAtHalfLife(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	root, err := ca.NewSelfSigned("cluster.local", 365*24*time.Hour, clk)
	if err != nil {
		t.Fatal(err)
	}
	sc := &ca.ServingCertificate{Names: []string{"trellis-xds.trellis-system.svc"}, Lifetime: 10 * time.Hour, Signer: func() *ca.Authority { return root }}
	at, err := sc.IssueNow()
	if err != nil {
		t.Fatal(err)
	}
	first, _ := sc.GetCertificate(nil)
	if first == nil || first.Leaf == nil && len(first.Certificate) == 0 {
		t.Fatal("no certificate served after IssueNow")
	}
	r := &ca.Renewals{Clock: clk}
	r.StartAt("xds", at, sc.Issue)
	defer r.StopAll()
	current := func() []byte { c, _ := sc.GetCertificate(nil); return c.Certificate[0] }
	clk.Step(4 * time.Hour)
	time.Sleep(20 * time.Millisecond)
	if string(current()) != string(first.Certificate[0]) {
		t.Fatal("renewed before half its lifetime")
	}
	clk.Step(2 * time.Hour)
	waitFor(t, "the renewal at half life", func() bool { return string(current()) != string(first.Certificate[0]) })
}
