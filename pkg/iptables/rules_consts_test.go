package iptables_test

import (
	"testing"

	"github.com/trellis-mesh/trellis/pkg/iptables"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// The rules let through what the translator's inbound clusters send.
func TestInboundBindAddressesMatchTheTranslator(t *testing.T) {
	if iptables.InboundBindIPv4 != translate.InboundBindIPv4 || iptables.InboundBindIPv6 != translate.InboundBindIPv6 {
		t.Errorf("iptables lets %s/%s through, the translator binds %s/%s",
			iptables.InboundBindIPv4, iptables.InboundBindIPv6, translate.InboundBindIPv4, translate.InboundBindIPv6)
	}
}
