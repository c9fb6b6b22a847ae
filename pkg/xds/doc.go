// Package xds serves the translator's results to proxies over ADS, both
// state-of-the-world and incremental (delta), with go-control-plane's
// server and Trellis's own cache (Cache). Proxies with identical translator
// inputs share one computed, pre-marshalled result (a class); every resource
// carries a content version, so an update reaches only the proxies whose
// subscribed resources changed, and an endpoint change re-sends only the
// affected ClusterLoadAssignments.
//
// Proxies authenticate with their pod's projected ServiceAccount token,
// verified with a TokenReview (Authenticator); a proxy only ever receives
// its own class, bound from its verified node id. Pusher debounces model
// updates like istiod and computes the classes of connected proxies.
package xds
