package spawn_test

import (
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/spawn"
)

// TestMain keeps the main thread for the main goroutine: a goroutine that
// exits locked on the main thread wedges it instead of ending it, which
// would hide the bug.
func TestMain(m *testing.M) {
	runtime.LockOSThread()
	os.Exit(m.Run())
}

// TestChildOutlivesEndedThreads: a child started with Pdeathsig survives
// the runtime ending OS threads (goroutines that exit while locked), which
// kills a child started with plain cmd.Start from such a thread.
func TestChildOutlivesEndedThreads(t *testing.T) {
	start := func(useSpawn bool) *exec.Cmd {
		cmd := exec.Command("sleep", "30")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		done := make(chan error, 1)
		// Fork from a goroutine that then exits locked: its thread ends.
		go func() {
			runtime.LockOSThread()
			if useSpawn {
				done <- spawn.Start(cmd)
			} else {
				done <- cmd.Start()
			}
		}()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	alive := func(cmd *exec.Cmd) bool {
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		select {
		case <-exited:
			return false
		case <-time.After(500 * time.Millisecond):
			_ = cmd.Process.Kill()
			<-exited
			return true
		}
	}
	if alive(start(false)) {
		t.Fatal("plain cmd.Start from a thread that ended: the child survived; the kernel's Pdeathsig-on-thread-exit no longer bites (go.dev/issue/27505)? then spawn is not needed")
	}
	if !alive(start(true)) {
		t.Fatal("a child started with spawn.Start was killed when the starting goroutine's thread ended")
	}
}
