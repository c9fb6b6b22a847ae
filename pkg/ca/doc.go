// Package ca issues the mesh's certificates: X.509 SVIDs for workloads
// (SPIFFE IDs in the URI SAN, ECDSA P-256) and serving certificates for
// the control plane's own listeners. Private keys are generated in memory
// and never leave the process except over an authenticated xDS stream.
//
// This is the in-memory authority the control plane starts with; keeping the
// root in a Secret, the cert-manager backend and root rotation build on it.
package ca
