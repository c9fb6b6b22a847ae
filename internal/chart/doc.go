// Package chart holds the tests of the Helm chart in charts/trellis: lint and
// golden renders through Helm's Go SDK, the rendered manifests applied to a
// real kube-apiserver (server-side dry run, then for real), install, upgrade
// and uninstall with the SDK, the values schema, and the RBAC proof — the
// controller process run with the chart ServiceAccount's token.
package chart
