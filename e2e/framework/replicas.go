package framework

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/chartinstall"
	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/spawn"
)

// Replicas is how many trellis-controller replicas the environment can
// run, as the chart's Deployment does (replicas: 2). Replica 0 runs from
// Start on; the HA scenarios start replica 1 beside it.
const Replicas = 2

// Leader election as the chart runs it, with shorter timings so that the
// HA scenarios see a killed leader replaced within seconds: a follower
// takes the Lease LeaseDuration after the leader's last renewal.
const (
	LeaseDuration = 8 * time.Second
	RenewDeadline = 6 * time.Second
	RetryPeriod   = time.Second
)

// replica is one running trellis-controller process.
type replica struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *os.File
	// logStart is where this run's lines begin in the (appended) log.
	logStart int64
}

// ReplicaHealthPort and ReplicaMetricsPort are replica i's probe and
// metrics (debug API) ports.
func ReplicaHealthPort(i int) int  { return HealthPort + 100*i }
func ReplicaMetricsPort(i int) int { return MetricsPort + 100*i }

// ReplicaLog is the path of replica i's log.
func (e *Env) ReplicaLog(i int) string {
	if i == 0 {
		return filepath.Join(e.Dir, "trellis-controller.log")
	}
	return filepath.Join(e.Dir, fmt.Sprintf("trellis-controller-%d.log", i))
}

// StartController starts replica 0 (see StartReplica).
func (e *Env) StartController(ctx context.Context) error { return e.StartReplica(ctx, 0) }

// StartReplica starts trellis-controller replica i, waits until it is
// ready and adds it to the Services.
func (e *Env) StartReplica(ctx context.Context, i int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.replicas[i] != nil {
		return fmt.Errorf("replica %d is running", i)
	}
	log, err := os.OpenFile(e.ReplicaLog(i), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	// The chart's arguments and ServiceAccount: a permission the chart lacks
	// fails the scenarios. Listeners move to this host's addresses, each
	// replica on its own ports behind the Services.
	cfg := e.Cluster.Env.Config
	token, err := chartinstall.ServiceAccountToken(ctx, cfg, ControllerNamespace, chartinstall.ServiceAccount, 12*time.Hour)
	if err != nil {
		log.Close()
		return err
	}
	kubeconfig := filepath.Join(e.Dir, "trellis-controller.kubeconfig")
	if err := chartinstall.TokenKubeconfig(cfg, token, kubeconfig); err != nil {
		log.Close()
		return err
	}
	args, err := chartinstall.ControllerArgs(ctx, cfg, ControllerNamespace, map[string]string{
		"--kubeconfig":                     kubeconfig,
		"--leader-election-lease-duration": LeaseDuration.String(),
		"--leader-election-renew-deadline": RenewDeadline.String(),
		"--leader-election-retry-period":   RetryPeriod.String(),
		"--metrics-bind-address":           fmt.Sprintf("%s:%d", GatewayIP, ReplicaMetricsPort(i)),
		// The chart's secure metrics endpoint (and debug API): trellisctl
		// reaches it with the admin kubeconfig's client certificate.
		"--metrics-secure":            "true",
		"--health-probe-bind-address": fmt.Sprintf("127.0.0.1:%d", ReplicaHealthPort(i)),
		"--xds-address":               fmt.Sprintf("%s:%d", GatewayIP, replicaPort(XDSPort, i)),
		"--xds-dns-names":             GatewayIP,
		"--xds-service-host":          GatewayIP,
		"--xds-service-port":          fmt.Sprint(XDSPort),
		"--webhook-bind-address":      fmt.Sprintf("127.0.0.1:%d", replicaPort(WebhookPort, i)),
		"--webhook-dns-names":         "127.0.0.1",
		"--xds-root-ca-out":           filepath.Join(e.Dir, "root-ca.pem"),
		// TestCertificateRotation goes through a root rotation's phases
		// in under a minute.
		"--root-rotation-overlap":        "15s",
		"--root-rotation-check-interval": "2s",
	})
	if err != nil {
		log.Close()
		return err
	}
	cmd := exec.Command(e.Bins["trellis-controller"], args...)
	cmd.Env = append(os.Environ(), "POD_NAMESPACE="+ControllerNamespace, "POD_NAME="+ReplicaName(i))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := spawn.Start(cmd); err != nil {
		log.Close()
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		// Its endpoint goes when the process does (the kubelet reports
		// the container gone; kube-proxy drops it).
		_ = e.services.setReady(i, false)
		close(done)
	}()
	e.replicas[i] = &replica{cmd: cmd, done: done, log: log}
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("trellis-controller replica %d exited; see %s", i, log.Name())
		default:
		}
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", ReplicaHealthPort(i))); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return e.services.setReady(i, true)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("trellis-controller replica %d not ready after a minute; see %s", i, log.Name())
}

// StopController stops every running replica (StopReplica).
func (e *Env) StopController() {
	for i := range Replicas {
		e.StopReplica(i)
	}
}

// StopReplica stops replica i: SIGTERM, SIGKILL after 10 s; it leaves the
// Services when it has exited. (Taking it out of the rules before its
// connections closed lost their FINs here: clients kept half-open
// connections to a process that was gone — Envoy's ADS stream, the
// apiserver's keep-alive webhook connection — and never reconnected.)
func (e *Env) StopReplica(i int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	r := e.replicas[i]
	if r == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
	}
	r.log.Close()
	e.replicas[i] = nil
}

// KillReplica kills replica i (SIGKILL: no Lease release, no goodbye to its
// streams) and returns when it has exited and left the Services.
func (e *Env) KillReplica(i int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	r := e.replicas[i]
	if r == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.log.Close()
	e.replicas[i] = nil
}

// Running says whether replica i runs.
func (e *Env) Running(i int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.replicas[i] != nil
}

// ReplicaName is replica i's pod name, its identity in the Lease.
func ReplicaName(i int) string { return fmt.Sprintf("trellis-controller-%d", i) }

// Leader is the running replica that holds the leader election Lease
// (-1: none does).
func (e *Env) Leader(ctx context.Context) int {
	var l coordinationv1.Lease
	if err := e.Cluster.Client().Get(ctx, client.ObjectKey{Namespace: ControllerNamespace, Name: controlplane.LeaseName}, &l); err != nil {
		return -1
	}
	for i := range Replicas {
		if l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == ReplicaName(i) && e.Running(i) {
			return i
		}
	}
	return -1
}
