// Package ca issues the mesh's certificates: X.509 SVIDs for workloads
// (SPIFFE IDs in the URI SAN, ECDSA P-256) and serving certificates for
// the control plane's own listeners. Private keys are generated in memory
// and never leave the process except over an authenticated xDS stream.
//
//   - Authority is the built-in CA: a self-signed root (NewSelfSigned),
//     kept in a Secret (LoadOrCreate, SecretData: the root's key is the
//     only key stored) and able to cross-sign its successor.
//   - Backend signs CSRs: an Authority, Rotating (the signer and trusted
//     roots of a root rotation, swapped atomically) or CertManager (a
//     cert-manager CertificateRequest per CSR).
//   - Issuer does the work around a Backend: key, CSR, metrics.
//   - Renewals keeps one certificate per key current (xds.Pusher keys them
//     by proxy): it owns every issuance's deadline (Timeout, on the
//     injected clock), the retry back-off (IssueRetryDelay), the renewal
//     at RotateAt and which of overlapping issuances is served.
//
// Root rotation's phases are driven by pkg/controller's RootRotation.
package ca
