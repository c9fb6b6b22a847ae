package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// errNoTelemetry: the control plane does not aggregate the sidecars'
// stats yet, so there is nothing true to show (no made-up numbers).
var errNoTelemetry = errors.New(`per-edge metrics need the control plane to aggregate the sidecars' stats, which it does not do yet (issue "Fleet telemetry").
Until then: each sidecar's own counters are at http://POD_IP:15020/stats/prometheus (envoy_cluster_upstream_rq_*)`)

// newTop is top or edges: they exist so that scripts and muscle memory
// find them, and say plainly that there is no data behind them yet.
func newTop(use string) *cobra.Command {
	short := map[string]string{
		"top":   "Live per-workload request rate, success rate and latency (not available yet)",
		"edges": "Per-edge (client → Service) golden metrics and mTLS (not available yet)",
	}[use]
	return &cobra.Command{
		Use:   use + " [NAMESPACE]",
		Short: short,
		Args:  cobra.MaximumNArgs(1),
		RunE:  func(*cobra.Command, []string) error { return errNoTelemetry },
	}
}
