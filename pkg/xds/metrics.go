package xds

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics of the xDS server. Register them with the manager's registry
// (controller-runtime's metrics.Registry) in main.
type Metrics struct {
	ConnectedProxies prometheus.Gauge
	Rounds           prometheus.Counter
	Pushes           *prometheus.CounterVec
	PushedResources  *prometheus.CounterVec
	PushedBytes      *prometheus.CounterVec
	NACKs            *prometheus.CounterVec
	Convergence      prometheus.Histogram
	Debounce         prometheus.Histogram
	Translate        prometheus.Histogram
	TranslateErrors  prometheus.Counter
	TokenReviewCache *prometheus.CounterVec
	AuthFailures     *prometheus.CounterVec
	OnDemandClusters *prometheus.CounterVec
	ClassUpdates     *prometheus.CounterVec
}

// NewMetrics creates the metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		ConnectedProxies: prometheus.NewGauge(prometheus.GaugeOpts{Name: "trellis_xds_connected_proxies", Help: "Proxies with an authenticated ADS stream."}),
		Rounds:           prometheus.NewCounter(prometheus.CounterOpts{Name: "trellis_xds_push_rounds_total", Help: "Push rounds completed."}),
		Pushes:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_pushes_total", Help: "xDS responses sent, by resource type."}, []string{"type"}),
		PushedResources:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_pushed_resources_total", Help: "Resources sent in xDS responses, by type."}, []string{"type"}),
		PushedBytes:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_pushed_bytes_total", Help: "Serialized bytes of resources sent, by type."}, []string{"type"}),
		NACKs:            prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_nacks_total", Help: "Responses a proxy rejected, by type."}, []string{"type"}),
		Convergence: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "trellis_xds_convergence_seconds", Help: "From the first change of a push round to a proxy's ACK of the result.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14)}),
		Debounce: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "trellis_xds_debounce_seconds", Help: "Time changes waited in the debouncer before a push round.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 12)}),
		Translate: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "trellis_translate_seconds", Help: "Time to translate one proxy class.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		TranslateErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "trellis_translate_rejected_total", Help: "Translation results that failed validation and were not served."}),
		TokenReviewCache: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_tokenreview_cache_total", Help: "Token reviews answered from the cache (hit) or the apiserver (miss)."}, []string{"result"}),
		AuthFailures:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_auth_failures_total", Help: "Rejected xDS streams, by gRPC code (ResourceExhausted: the replica's stream cap)."}, []string{"code"}),
		OnDemandClusters: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_ondemand_resolutions_total", Help: "On-demand cluster names (pod IPs) resolved, once per name and push round, by whether the cluster exists."}, []string{"found"}),
		ClassUpdates:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trellis_xds_class_updates_total", Help: "Proxy classes brought up to date in a push round, by how: translated in full, or only their changed ClusterLoadAssignments recomputed (a change of endpoints only)."}, []string{"kind"}),
	}
}

// Collectors lists the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.ConnectedProxies, m.Rounds, m.Pushes, m.PushedResources, m.PushedBytes, m.NACKs, m.Convergence, m.Debounce, m.Translate, m.TranslateErrors, m.TokenReviewCache, m.AuthFailures, m.OnDemandClusters, m.ClassUpdates}
}
