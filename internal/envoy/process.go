package envoy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/trellis-mesh/trellis/internal/spawn"
)

// Options say how to run one Envoy.
type Options struct {
	// Bootstrap is the bootstrap (YAML or JSON), passed as --config-yaml.
	Bootstrap string
	// AdminSocket is the Unix socket the bootstrap's admin listens on
	// (admin.address.pipe.path); the admin helpers dial it.
	AdminSocket string
	// Log is the file Envoy's output goes to.
	Log string
	// Isolated runs Envoy in a network namespace of its own (and a user
	// namespace when not root), so listeners on fixed ports never collide
	// with the host or with other Envoys. Its only ways out are Unix sockets.
	Isolated bool
	// Args are extra command-line arguments.
	Args []string
}

// Proxy is a running Envoy.
type Proxy struct {
	cmd    *exec.Cmd
	done   chan struct{}
	err    error
	log    string
	client *http.Client
}

// Start runs Envoy and returns once its admin endpoint answers.
func Start(ctx context.Context, o Options) (*Proxy, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(o.Log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	args := append([]string{
		"--config-yaml", o.Bootstrap,
		"--concurrency", "1",
		// Every test Envoy is a first epoch: no hot-restart shared memory
		// that a second Envoy on the host would collide with.
		"--disable-hot-restart",
		"--log-level", "info",
	}, o.Args...)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if o.Isolated {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
		if os.Geteuid() != 0 {
			cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
			cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}}
			cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}}
		}
	}
	if err := spawn.Start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start envoy: %w", err)
	}
	p := &Proxy{cmd: cmd, done: make(chan struct{}), log: o.Log, client: &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", o.AdminSocket)
		}},
	}}
	go func() { p.err = cmd.Wait(); logf.Close(); close(p.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := p.Get(ctx, "/ready"); err == nil || isHTTPStatus(err) {
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("envoy exited (%v): %s", p.err, p.Tail(40))
		case <-ctx.Done():
			p.Stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("envoy admin did not answer in 30 s: %s", p.Tail(40))
		}
	}
}

// StatusError is an admin answer other than 200.
type StatusError struct {
	Code int
	Body string
}

func (e *StatusError) Error() string { return "admin answered " + strconv.Itoa(e.Code) + ": " + e.Body }

func isHTTPStatus(err error) bool {
	var s *StatusError
	return errors.As(err, &s)
}

// Get fetches an admin path (e.g. /stats?format=json).
func (p *Proxy) Get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://envoy-admin"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return b, &StatusError{Code: resp.StatusCode, Body: string(b)}
	}
	return b, nil
}

// Done is closed when Envoy has exited.
func (p *Proxy) Done() <-chan struct{} { return p.done }

// Tail is the end of Envoy's log, for failure messages.
func (p *Proxy) Tail(lines int) string {
	b, _ := os.ReadFile(p.log)
	n := 0
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\n' {
			if n++; n > lines {
				return string(b[i+1:])
			}
		}
	}
	return string(b)
}

// Stop ends Envoy (SIGTERM, SIGKILL after 5 s).
func (p *Proxy) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// SocketPath joins dir and name, checking the Unix socket path limit.
func SocketPath(dir, name string) (string, error) {
	p := filepath.Join(dir, name)
	if len(p) >= 108 {
		return "", fmt.Errorf("unix socket path %s is too long", p)
	}
	return p, nil
}
