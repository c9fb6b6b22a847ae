// Package model is the mesh model: plain Go data describing services and
// their ports and endpoints, workloads and their identities, and the policies
// and routes that apply, resolved from Kubernetes objects by Build. The
// controller keeps the objects and calls Build; the translator
// (pkg/translate) turns a Mesh into Envoy resources for one proxy. Nothing
// here talks to a Kubernetes client, a network or a clock.
package model
