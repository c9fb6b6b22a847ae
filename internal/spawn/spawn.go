// Package spawn starts child processes that must die with this process
// (SysProcAttr.Pdeathsig), without dying at random before.
//
// Linux sends the parent-death signal when the *thread* that forked the
// child exits, not the process. The Go runtime ends OS threads: a goroutine
// that exits while locked to its thread (as code entering a network
// namespace does, on purpose) takes the thread with it — and that thread
// may be the one that earlier forked a child, which then gets SIGKILL while
// this process runs on. Start forks from a thread locked until the child
// has exited.
package spawn

import (
	"errors"
	"os/exec"
	"runtime"

	"golang.org/x/sys/unix"
)

// Start starts cmd (as cmd.Start does) from an OS thread that stays alive
// until the child exits. The caller still waits for cmd as usual.
func Start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			errc <- err
			return
		}
		errc <- nil
		// Until the child exits, without reaping it (the caller's Wait does).
		var info unix.Siginfo
		for {
			err := unix.Waitid(unix.P_PID, cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
			if !errors.Is(err, unix.EINTR) {
				return
			}
		}
	}()
	return <-errc
}
