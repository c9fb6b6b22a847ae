// Package iptables builds the traffic redirection trellis-init installs in a
// pod's network namespace: inbound TCP to the sidecar's 15006, outbound TCP
// to 15001, except the sidecar's own traffic (its UID), loopback, the
// sidecar's ports and the ports and CIDRs a pod excludes. The rules are data
// (Rules), applied atomically with iptables-restore (Apply); applying twice
// changes nothing.
package iptables
