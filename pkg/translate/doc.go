// Package translate turns the mesh model (pkg/model) into the Envoy
// resources one proxy needs: listeners, routes, clusters and endpoints, with
// references to the SDS secrets the CA serves. Sidecar is a pure function:
// no client, no clock, no goroutines, no I/O. Its output is deterministic
// (sorted, stable names), so identical inputs give byte-identical resources
// that the xDS server can cache and share between proxies.
//
// CheckReferences is the cross-reference check the xDS server runs before a
// push, next to go-control-plane's ValidateAll: together they catch what
// would make Envoy NACK.
package translate
