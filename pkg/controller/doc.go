// Package controller holds the reconcilers: they watch Services,
// EndpointSlices, Pods, the Trellis CRDs and Gateway API routes, rebuild the
// mesh model (pkg/model) and hand it to the xDS pusher, and write status
// conditions on the objects the model or the translator found problems with.
// Every replica builds the model (each serves xDS); only the leader writes
// status.
package controller
