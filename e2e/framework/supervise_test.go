package framework

import (
	"context"
	"fmt"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// TestSuperviseRestartsWithBackoff runs a real process that exits at once
// under supervise: it is started again, the first restart at once and the
// later ones after a doubling, capped back-off, until the context ends.
func TestSuperviseRestartsWithBackoff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var starts []time.Time
	var logs []string
	b := backoff{initial: 40 * time.Millisecond, max: 80 * time.Millisecond, reset: time.Hour}
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		supervise(ctx, b, func() (<-chan struct{}, func() string, error) {
			mu.Lock()
			starts = append(starts, time.Now())
			n := len(starts)
			mu.Unlock()
			if n == 5 {
				cancel()
			}
			cmd := exec.Command("sh", "-c", "exit 3")
			if err := cmd.Start(); err != nil {
				return nil, nil, err
			}
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			return done, func() string { return cmd.ProcessState.String() }, nil
		}, func(format string, args ...any) {
			mu.Lock()
			defer mu.Unlock()
			logs = append(logs, fmt.Sprintf(format, args...))
		})
	}()
	select {
	case <-finished:
	case <-time.After(time.Minute):
		t.Fatal("supervise did not return after its context ended")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(starts) != 5 {
		t.Fatalf("started %d times, want 5 (restarted until the context ended); log: %q", len(starts), logs)
	}
	// Waits: 0, initial, 2×initial, then capped at max.
	for i, least := range []time.Duration{0, 40 * time.Millisecond, 80 * time.Millisecond, 80 * time.Millisecond} {
		if gap := starts[i+1].Sub(starts[i]); gap < least {
			t.Errorf("restart %d came %s after the previous start, want at least %s", i+1, gap, least)
		}
	}
	want := []string{"exited: exit status 3", "restart 1 now", "exited: exit status 3", "restart 2 in 40ms (back-off)", "exited: exit status 3", "restart 3 in 80ms (back-off)"}
	for i, w := range want {
		if i >= len(logs) || logs[i] != w {
			t.Fatalf("log %q, want it to begin %q", logs, want)
		}
	}
}

// TestSuperviseRetriesAFailedStart: a start that fails is retried after
// the back-off too (a controller binary that cannot start is not given up).
func TestSuperviseRetriesAFailedStart(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n := 0
	supervise(ctx, backoff{initial: time.Millisecond, max: time.Millisecond, reset: time.Hour}, func() (<-chan struct{}, func() string, error) {
		n++
		if n == 3 {
			cancel()
		}
		return nil, nil, fmt.Errorf("no such binary")
	}, func(string, ...any) {})
	if n != 3 {
		t.Fatalf("start called %d times, want 3", n)
	}
}
