package ca

import (
	"cmp"
	"context"
	"fmt"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// DefaultIssueTimeout is Renewals.Timeout's default.
const DefaultIssueTimeout = 30 * time.Second

// Retry back-off of a failed issuance: 10 s, doubling, at most 2 min.
const (
	issueRetryInitial = 10 * time.Second
	issueRetryMax     = 2 * time.Minute
)

// IssueRetryDelay is the wait after the n-th failure in a row (n >= 1).
func IssueRetryDelay(n int) time.Duration {
	d := issueRetryInitial
	for i := 1; i < n && d < issueRetryMax; i++ {
		d *= 2
	}
	return min(d, issueRetryMax)
}

// Issuance is what one issuance obtained.
type Issuance struct {
	// RotateAt is when to issue again.
	RotateAt time.Time
	// Serve hands the certificate to whoever uses it. Renewals calls it
	// only while this issuance is the key's latest, one Serve at a time
	// per key.
	Serve func()
}

// IssueFunc obtains a certificate; ctx carries the issuance's deadline
// and ends when the key is stopped or restarted.
type IssueFunc func(ctx context.Context) (Issuance, error)

// Renewals keeps one certificate per key (a proxy, a listener) current:
// it owns every issuance's deadline (Timeout, on Clock), the retry
// back-off after a failure (IssueRetryDelay), the renewal at RotateAt and
// what happens to issuances that overlap — a scheduled renewal and a
// Refresh after a root rotation step: only the latest started is served.
// An older one finishing last would put back a certificate from the
// previous signer, e.g. an old-root certificate in the Complete phase,
// which peers no longer trust.
type Renewals struct {
	// Clock runs the deadlines and renewals; its AfterFunc callbacks may
	// run under its lock (the fake clock's do), so they only start
	// goroutines.
	Clock clock.WithDelayedExecution
	// Timeout bounds one issuance (default DefaultIssueTimeout): a
	// cert-manager CertificateRequest nobody approves fails after it.
	Timeout time.Duration
	// OnFailure, when set, learns of each failed issuance and when it is
	// retried.
	OnFailure func(key string, err error, retryIn time.Duration)

	mu   sync.Mutex
	keys map[string]*renewal
}

type renewal struct {
	issue IssueFunc
	// seq numbers the issuances started: only the latest one is served.
	seq uint64
	// failures counts issuances failed in a row (the retry back-off).
	failures int
	timer    clock.Timer
	// ctx ends when the key is stopped or restarted.
	ctx    context.Context
	cancel context.CancelFunc
	// serveMu orders Serve calls of the key.
	serveMu sync.Mutex
}

// Start issues the key's certificate now and keeps it renewed until Stop;
// a key already started is restarted (its issuances in flight end).
func (r *Renewals) Start(key string, issue IssueFunc) {
	if k := r.add(key, issue); k != nil {
		go r.run(key, k)
	}
}

// StartAt is Start for a key whose current certificate is served already:
// the first issuance runs at at.
func (r *Renewals) StartAt(key string, at time.Time, issue IssueFunc) {
	k := r.add(key, issue)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys[key] == k {
		r.scheduleLocked(key, k, at)
	}
}

func (r *Renewals) add(key string, issue IssueFunc) *renewal {
	ctx, cancel := context.WithCancel(context.Background())
	k := &renewal{issue: issue, ctx: ctx, cancel: cancel}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys == nil {
		r.keys = map[string]*renewal{}
	}
	if old := r.keys[key]; old != nil {
		old.stop()
	}
	r.keys[key] = k
	return k
}

// Stop ends the key's renewals and its issuances in flight.
func (r *Renewals) Stop(key string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if k := r.keys[key]; k != nil {
		k.stop()
		delete(r.keys, key)
	}
}

// StopAll stops every key (at shutdown).
func (r *Renewals) StopAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for key, k := range r.keys {
		k.stop()
		delete(r.keys, key)
	}
}

// Refresh issues every key's certificate again now (the signer or the
// trust bundle changed).
func (r *Renewals) Refresh() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for key, k := range r.keys {
		go r.run(key, k)
	}
}

func (k *renewal) stop() {
	k.cancel()
	if k.timer != nil {
		k.timer.Stop()
	}
}

// current says whether k is still the key's renewal and seq its latest
// issuance (r.mu held).
func (r *Renewals) current(key string, k *renewal, seq uint64) bool {
	return r.keys[key] == k && k.seq == seq
}

func (r *Renewals) run(key string, k *renewal) {
	r.mu.Lock()
	if r.keys[key] != k {
		r.mu.Unlock()
		return // stopped or restarted meanwhile
	}
	k.seq++
	seq := k.seq
	r.mu.Unlock()

	timeout := cmp.Or(r.Timeout, DefaultIssueTimeout)
	ctx, cancel := context.WithCancelCause(k.ctx)
	deadline := r.Clock.AfterFunc(timeout, func() { cancel(fmt.Errorf("no certificate within %s", timeout)) })
	res, err := k.issue(ctx)
	deadline.Stop()
	cancel(nil)

	if err != nil {
		r.mu.Lock()
		if !r.current(key, k, seq) {
			r.mu.Unlock()
			return // stopped or superseded: nobody waits for this one
		}
		k.failures++
		delay := IssueRetryDelay(k.failures)
		r.scheduleLocked(key, k, r.Clock.Now().Add(delay))
		r.mu.Unlock()
		if r.OnFailure != nil {
			r.OnFailure(key, err, delay)
		}
		return
	}
	// The check and Serve under serveMu (not mu: Serve may block, e.g. on
	// a proxy's stream), so a newer issuance cannot be overtaken between
	// them.
	k.serveMu.Lock()
	r.mu.Lock()
	latest := r.current(key, k, seq)
	if latest {
		k.failures = 0
	}
	r.mu.Unlock()
	if latest && res.Serve != nil {
		res.Serve()
	}
	k.serveMu.Unlock()
	if !latest {
		return
	}
	r.mu.Lock()
	if r.current(key, k, seq) {
		r.scheduleLocked(key, k, res.RotateAt)
	}
	r.mu.Unlock()
}

// scheduleLocked runs the key's next issuance at at (r.mu held).
func (r *Renewals) scheduleLocked(key string, k *renewal, at time.Time) {
	if k.timer != nil {
		k.timer.Stop()
	}
	k.timer = r.Clock.AfterFunc(at.Sub(r.Clock.Now()), func() { go r.run(key, k) })
}
