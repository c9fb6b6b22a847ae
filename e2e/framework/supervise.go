package framework

import (
	"context"
	"fmt"
	"syscall"
	"time"
)

// Restart back-off of a crashed process, the kubelet's CrashLoopBackOff:
// the first restart at once, then 10 s doubling to 5 min; a process that
// ran for 10 min starts over at once.
const (
	restartBackoffInitial = 10 * time.Second
	restartBackoffMax     = 5 * time.Minute
	restartBackoffReset   = 10 * time.Minute
)

// backoff is the restart policy of supervise.
type backoff struct{ initial, max, reset time.Duration }

// supervise keeps a process running as a Deployment's kubelet would: start
// returns a channel closed when the process exits and a description of how
// it exited (called after the close); whenever it exits while ctx is live
// it is started again after the back-off. A failed start counts as an exit.
// Returns when ctx is done.
func supervise(ctx context.Context, b backoff, start func() (<-chan struct{}, func() string, error), logf func(string, ...any)) {
	var next time.Duration // the wait before the restart after the coming exit
	for restarts := 1; ; restarts++ {
		began := time.Now()
		done, how, err := start()
		if err == nil {
			select {
			case <-ctx.Done():
			case <-done:
			}
		}
		if ctx.Err() != nil {
			return // stopping: an exit now is the shutdown's
		}
		if err != nil {
			logf("start failed: %v", err)
		} else {
			logf("exited: %s", how())
		}
		if err == nil && time.Since(began) >= b.reset {
			next = 0
		}
		delay := next
		next = min(max(2*next, b.initial), b.max)
		if delay > 0 {
			logf("restart %d in %s (back-off)", restarts, delay)
		} else {
			logf("restart %d now", restarts)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}

// KeepControllerRunning keeps replica 0 running (KeepReplicaRunning):
// `make demo` behaves as a Deployment would.
func (e *Env) KeepControllerRunning(ctx context.Context, logf func(string, ...any)) {
	e.KeepReplicaRunning(ctx, 0, logf)
}

// KeepReplicaRunning restarts replica i whenever it exits without
// StopReplica (killed, crashed, lost its Lease), with the kubelet's
// back-off, until ctx is done. Replica i is started first if it is not
// running.
func (e *Env) KeepReplicaRunning(ctx context.Context, i int, logf func(string, ...any)) {
	supervise(ctx, backoff{restartBackoffInitial, restartBackoffMax, restartBackoffReset}, func() (<-chan struct{}, func() string, error) {
		if !e.Running(i) {
			if err := e.StartReplica(ctx, i); err != nil {
				return nil, nil, err
			}
		}
		e.mu.Lock()
		r := e.replicas[i]
		e.mu.Unlock()
		if r == nil {
			return nil, nil, fmt.Errorf("trellis-controller replica %d is not running", i)
		}
		return r.done, func() string {
			e.mu.Lock()
			defer e.mu.Unlock()
			if e.replicas[i] == r { // not stopped by StopReplica or KillReplica
				r.log.Close()
				e.replicas[i] = nil
			}
			st := r.cmd.ProcessState
			if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				return "killed by " + ws.Signal().String()
			}
			return st.String()
		}, nil
	}, func(format string, args ...any) {
		logf(fmt.Sprintf("trellis-controller replica %d ", i)+format, args...)
	})
}
