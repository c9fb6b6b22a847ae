package translate

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/trellis-mesh/trellis/pkg/model"
)

// ClassKey identifies everything Sidecar reads about the proxy itself:
// namespace, ServiceAccount, zone, proxy mode and the ports and Services the
// pod serves. Two workloads with the same key get byte-identical resources
// from the same mesh, so the xDS server computes one result per key and
// shares it (pods of one Deployment usually share a key).
func ClassKey(mesh *model.Mesh, w *model.Workload) string {
	t := &translator{mesh: mesh, proxy: w}
	var b strings.Builder
	fmt.Fprintf(&b, "mode=%s\nns=%s\nsa=%s\nzone=%s\n", w.Mode, w.Namespace, w.ServiceAccount, w.Zone)
	for _, ip := range t.inboundPorts() {
		fmt.Fprintf(&b, "in=%d/%s", ip.port, ip.protocol)
		for _, s := range ip.services {
			ports := slices.Clone(ip.svcPorts[s])
			slices.Sort(ports)
			fmt.Fprintf(&b, " %s/%s%v", s.Namespace, s.Name, ports)
		}
		b.WriteByte('\n')
	}
	for _, path := range sortedKeys(w.Probes) {
		j, _ := json.Marshal(w.Probes[path])
		fmt.Fprintf(&b, "probe=%s %s\n", path, j)
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:12])
}
