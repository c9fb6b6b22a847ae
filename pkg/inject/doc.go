// Package inject adds the data plane to a pod: for Envoy pods the
// trellis-init init container (iptables redirection) and the stock Envoy
// proxy as a native sidecar with its bootstrap inline; for proxyless gRPC
// pods (annotation trellis.dev/proxy: grpc) the gRPC xDS bootstrap. Pod is a
// pure function; the admission webhook around it lives beside it.
package inject
