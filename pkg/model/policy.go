package model

import (
	"slices"
	"strings"

	"k8s.io/utils/ptr"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// TrafficPolicy is a BackendPolicy resolved by Build (CRD defaults
// applied, durations parsed, values clamped to what they may be): what
// clients apply to calls to a Service and, for RateLimit, its servers. A
// nil field asks for nothing: the translator's defaults apply.
type TrafficPolicy struct {
	// Namespace and Name of the BackendPolicy.
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Timeout of a whole request (0: none); a route's own wins.
	Timeout *Duration `json:"timeout,omitempty"`
	Retries *Retries  `json:"retries,omitempty"`
	// ConnectTimeout bounds a TCP connect; 0 keeps the default.
	ConnectTimeout Duration          `json:"connectTimeout,omitempty"`
	Limits         *ConnectionLimits `json:"limits,omitempty"`
	Outlier        *OutlierDetection `json:"outlierDetection,omitempty"`
	// LoadBalancer is RoundRobin, LeastRequest, RingHash, Random or "".
	LoadBalancer string `json:"loadBalancer,omitempty"`
	// HashHeader is the header RingHash hashes ("" none).
	HashHeader string `json:"hashHeader,omitempty"`
	// RateLimit is nil unless it limits something.
	RateLimit *RateLimit `json:"rateLimit,omitempty"`
	// Fault is nil unless it delays or aborts something.
	Fault *Fault `json:"fault,omitempty"`
}

// Retries of failed requests.
type Retries struct {
	Attempts uint32 `json:"attempts"`
	// On are the retriable conditions, sorted (empty: the default ones).
	On []string `json:"retryOn,omitempty"`
	// PerTryTimeout bounds each try (0: none).
	PerTryTimeout Duration `json:"perTryTimeout,omitempty"`
}

// ConnectionLimits are circuit-breaking thresholds; nil leaves one at the
// default.
type ConnectionLimits struct {
	MaxConnections     *uint32 `json:"maxConnections,omitempty"`
	MaxPendingRequests *uint32 `json:"maxPendingRequests,omitempty"`
	MaxRequests        *uint32 `json:"maxRequests,omitempty"`
	MaxRetries         *uint32 `json:"maxRetries,omitempty"`
}

// OutlierDetection ejects failing endpoints.
type OutlierDetection struct {
	Consecutive5xx     uint32 `json:"consecutive5xx"`
	MaxEjectionPercent uint32 `json:"maxEjectionPercent"`
	// Interval and BaseEjectionTime are 0 for the default.
	Interval         Duration `json:"interval,omitempty"`
	BaseEjectionTime Duration `json:"baseEjectionTime,omitempty"`
}

// RateLimit is a token bucket of Requests per Interval, per server proxy.
type RateLimit struct {
	Requests uint32   `json:"requests"`
	Interval Duration `json:"interval"`
}

// Fault delays or aborts a share of the requests.
type Fault struct {
	Delay *FaultDelay `json:"delay,omitempty"`
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay delays Percent of the requests by Duration.
type FaultDelay struct {
	Duration Duration `json:"duration"`
	Percent  uint32   `json:"percent"`
}

// FaultAbort answers Percent of the requests with GRPCStatus, when set, or
// HTTPStatus.
type FaultAbort struct {
	Percent    uint32  `json:"percent"`
	HTTPStatus uint32  `json:"httpStatus,omitempty"`
	GRPCStatus *uint32 `json:"grpcStatus,omitempty"`
}

// trafficPolicy resolves a BackendPolicy's spec (defaults applied).
func trafficPolicy(namespace, name string, spec meshv1alpha1.BackendPolicySpec) *TrafficPolicy {
	p := &TrafficPolicy{Namespace: namespace, Name: name}
	if spec.Timeout != nil {
		if d, ok := parseDuration(string(*spec.Timeout)); ok {
			p.Timeout = &d
		}
	}
	if r := spec.Retries; r != nil {
		p.Retries = &Retries{Attempts: uint32(max(r.Attempts, 0))}
		for _, c := range r.RetryOn {
			p.Retries.On = append(p.Retries.On, string(c))
		}
		slices.Sort(p.Retries.On)
		if r.PerTryTimeout != nil {
			if d, ok := parseDuration(string(*r.PerTryTimeout)); ok && d > 0 {
				p.Retries.PerTryTimeout = d
			}
		}
	}
	if cs := spec.Connection; cs != nil {
		if cs.ConnectTimeout != nil {
			if d, ok := parseDuration(string(*cs.ConnectTimeout)); ok && d > 0 {
				p.ConnectTimeout = d
			}
		}
		if cs.MaxConnections != nil || cs.MaxPendingRequests != nil || cs.MaxRequests != nil || cs.MaxRetries != nil {
			p.Limits = &ConnectionLimits{
				MaxConnections: limit(cs.MaxConnections), MaxPendingRequests: limit(cs.MaxPendingRequests),
				MaxRequests: limit(cs.MaxRequests), MaxRetries: limit(cs.MaxRetries),
			}
		}
	}
	if od := spec.OutlierDetection; od != nil {
		p.Outlier = &OutlierDetection{Consecutive5xx: uint32(max(od.Consecutive5xxErrors, 1)), MaxEjectionPercent: clampPercent(od.MaxEjectionPercent)}
		if d, ok := parseDuration(string(od.Interval)); ok && d > 0 {
			p.Outlier.Interval = d
		}
		if d, ok := parseDuration(string(od.BaseEjectionTime)); ok && d > 0 {
			p.Outlier.BaseEjectionTime = d
		}
	}
	if lb := spec.LoadBalancer; lb != nil {
		p.LoadBalancer = string(lb.Algorithm)
		if lb.HashHeader != nil {
			p.HashHeader = strings.ToLower(*lb.HashHeader)
		}
	}
	if rl := spec.RateLimit; rl != nil {
		if d, ok := parseDuration(string(rl.Interval)); ok && d > 0 && rl.Requests > 0 {
			p.RateLimit = &RateLimit{Requests: uint32(rl.Requests), Interval: d}
		}
	}
	if fi := spec.FaultInjection; fi != nil {
		f := &Fault{}
		if d := fi.Delay; d != nil {
			if dd, ok := parseDuration(string(d.Duration)); ok {
				f.Delay = &FaultDelay{Duration: dd, Percent: clampPercent(d.Percent)}
			}
		}
		if a := fi.Abort; a != nil {
			f.Abort = &FaultAbort{Percent: clampPercent(a.Percent)}
			if a.GRPCStatus != nil {
				f.Abort.GRPCStatus = ptr.To(uint32(*a.GRPCStatus))
			} else {
				f.Abort.HTTPStatus = uint32(ptr.Deref(a.HTTPStatus, 503))
			}
		}
		if f.Delay != nil || f.Abort != nil {
			p.Fault = f
		}
	}
	return p
}

func limit(v *int32) *uint32 {
	if v == nil || *v < 0 {
		return nil
	}
	return ptr.To(uint32(*v))
}

func clampPercent(p int32) uint32 { return uint32(min(max(p, 0), 100)) }
