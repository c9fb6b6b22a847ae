package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// BackendPolicy shapes how clients reach the target Services: retries,
// timeouts, circuit breaking, outlier detection, load balancing (applied on
// the client side) and local rate limiting and fault injection (applied on
// the server side, in front of the application).
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:shortName=bp
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=`.status.conditions[?(@.type=="Programmed")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type BackendPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   BackendPolicySpec `json:"spec"`
	Status PolicyStatus      `json:"status,omitempty"`
}

// BackendPolicySpec is the desired traffic policy for the target Services.
// +kubebuilder:validation:XValidation:rule="has(self.retries) || has(self.timeout) || has(self.connection) || has(self.outlierDetection) || has(self.loadBalancer) || has(self.rateLimit) || has(self.faultInjection)",message="a BackendPolicy must set at least one of retries, timeout, connection, outlierDetection, loadBalancer, rateLimit or faultInjection"
// +kubebuilder:validation:XValidation:rule="!has(self.timeout) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) < duration(self.timeout)",message="retries.perTryTimeout must be shorter than timeout",fieldPath=".retries.perTryTimeout"
type BackendPolicySpec struct {
	// TargetRefs are the Services, in this namespace, the policy applies to.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	TargetRefs []PolicyTargetReference `json:"targetRefs"`

	// Timeout of a whole request, retries included, for HTTP and gRPC ports.
	// A route's own timeout (HTTPRoute timeouts.request) takes precedence.
	// +optional
	Timeout *Duration `json:"timeout,omitempty"`

	// Retries of failed HTTP and gRPC requests.
	// +optional
	Retries *Retries `json:"retries,omitempty"`

	// Connection limits and timeouts (circuit breaking).
	// +optional
	Connection *ConnectionSettings `json:"connection,omitempty"`

	// OutlierDetection ejects endpoints that keep failing.
	// +optional
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`

	// LoadBalancer selects the load-balancing algorithm.
	// +optional
	LoadBalancer *LoadBalancer `json:"loadBalancer,omitempty"`

	// RateLimit limits the request rate each server-side proxy of the
	// target accepts (a token bucket per proxy, not global); excess requests
	// get HTTP 429.
	// +optional
	RateLimit *LocalRateLimit `json:"rateLimit,omitempty"`

	// FaultInjection delays or aborts a share of the requests to the target,
	// for testing resilience.
	// +optional
	FaultInjection *FaultInjection `json:"faultInjection,omitempty"`
}

// RetryOn is a condition under which a request is retried (Envoy's
// x-envoy-retry-on and x-envoy-retry-grpc-on values).
// +kubebuilder:validation:Enum="5xx";gateway-error;reset;connect-failure;retriable-4xx;refused-stream;cancelled;deadline-exceeded;internal;resource-exhausted;unavailable
type RetryOn string

// Retries configures retries.
type Retries struct {
	// Attempts is the number of retries after the first try.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=10
	// +kubebuilder:default=2
	// +optional
	Attempts int32 `json:"attempts"`
	// PerTryTimeout bounds each try; it must be shorter than timeout.
	// +optional
	PerTryTimeout *Duration `json:"perTryTimeout,omitempty"`
	// RetryOn lists the retriable conditions.
	// +kubebuilder:validation:MaxItems=11
	// +kubebuilder:default={"connect-failure","refused-stream","unavailable","cancelled","5xx"}
	// +listType=set
	// +optional
	RetryOn []RetryOn `json:"retryOn,omitempty"`
}

// ConnectionSettings are the circuit-breaking thresholds and connect timeout
// each client proxy applies to the target.
type ConnectionSettings struct {
	// ConnectTimeout bounds establishing a TCP connection.
	// +optional
	ConnectTimeout *Duration `json:"connectTimeout,omitempty"`
	// MaxConnections to all endpoints of the target.
	// +kubebuilder:validation:Minimum=1
	// +optional
	MaxConnections *int32 `json:"maxConnections,omitempty"`
	// MaxPendingRequests waiting for a connection.
	// +kubebuilder:validation:Minimum=1
	// +optional
	MaxPendingRequests *int32 `json:"maxPendingRequests,omitempty"`
	// MaxRequests in flight (HTTP/2 and gRPC).
	// +kubebuilder:validation:Minimum=1
	// +optional
	MaxRequests *int32 `json:"maxRequests,omitempty"`
	// MaxRetries in flight.
	// +kubebuilder:validation:Minimum=0
	// +optional
	MaxRetries *int32 `json:"maxRetries,omitempty"`
}

// OutlierDetection configures passive health checking.
type OutlierDetection struct {
	// Consecutive5xxErrors (or gRPC/connect failures) that eject an endpoint.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:default=5
	// +optional
	Consecutive5xxErrors int32 `json:"consecutive5xxErrors,omitempty"`
	// Interval between ejection sweeps.
	// +kubebuilder:default="10s"
	// +optional
	Interval Duration `json:"interval,omitempty"`
	// BaseEjectionTime, multiplied by the number of ejections so far.
	// +kubebuilder:default="30s"
	// +optional
	BaseEjectionTime Duration `json:"baseEjectionTime,omitempty"`
	// MaxEjectionPercent of endpoints ejected at once.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	// +kubebuilder:default=50
	// +optional
	MaxEjectionPercent int32 `json:"maxEjectionPercent,omitempty"`
}

// LoadBalancingAlgorithm is Envoy's endpoint picking policy.
// +kubebuilder:validation:Enum=RoundRobin;LeastRequest;RingHash;Random
type LoadBalancingAlgorithm string

// LoadBalancer selects the algorithm.
// +kubebuilder:validation:XValidation:rule="has(self.hashHeader) == (self.algorithm == 'RingHash')",message="hashHeader must be set exactly when algorithm is RingHash",fieldPath=".hashHeader"
type LoadBalancer struct {
	// Algorithm is RoundRobin, LeastRequest, RingHash or Random.
	// +kubebuilder:default=RoundRobin
	// +optional
	Algorithm LoadBalancingAlgorithm `json:"algorithm,omitempty"`
	// HashHeader is the request header whose value RingHash hashes, so
	// requests with the same value reach the same endpoint.
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9!#$%&'*+\-.^_|~]+$`
	// +kubebuilder:validation:MaxLength=256
	// +optional
	HashHeader *string `json:"hashHeader,omitempty"`
}

// LocalRateLimit is a token bucket.
type LocalRateLimit struct {
	// Requests allowed per interval.
	// +kubebuilder:validation:Minimum=1
	Requests int32 `json:"requests"`
	// Interval in which the bucket refills completely.
	// +kubebuilder:default="1s"
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('50ms')",message="rateLimit.interval must be at least 50ms"
	// +optional
	Interval Duration `json:"interval,omitempty"`
}

// FaultInjection delays or aborts requests.
// +kubebuilder:validation:XValidation:rule="has(self.delay) || has(self.abort)",message="faultInjection needs delay or abort"
type FaultInjection struct {
	// +optional
	Delay *FaultDelay `json:"delay,omitempty"`
	// +optional
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay delays a share of requests.
type FaultDelay struct {
	// Duration of the delay.
	Duration Duration `json:"duration"`
	// Percent of requests delayed.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Percent int32 `json:"percent"`
}

// FaultAbort answers a share of requests with an error instead of the
// application.
// +kubebuilder:validation:XValidation:rule="has(self.httpStatus) != has(self.grpcStatus)",message="set exactly one of httpStatus or grpcStatus"
type FaultAbort struct {
	// HTTPStatus returned, e.g. 503.
	// +kubebuilder:validation:Minimum=200
	// +kubebuilder:validation:Maximum=599
	// +optional
	HTTPStatus *int32 `json:"httpStatus,omitempty"`
	// GRPCStatus code returned, e.g. 14 (UNAVAILABLE).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=16
	// +optional
	GRPCStatus *int32 `json:"grpcStatus,omitempty"`
	// Percent of requests aborted.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Percent int32 `json:"percent"`
}

// BackendPolicyList is a list of BackendPolicy.
// +kubebuilder:object:root=true
type BackendPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BackendPolicy `json:"items"`
}
