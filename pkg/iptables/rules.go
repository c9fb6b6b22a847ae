package iptables

import (
	"bytes"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
)

// Chains Trellis owns in the nat table.
const (
	ChainInbound    = "TRELLIS_INBOUND"
	ChainInRedirect = "TRELLIS_IN_REDIRECT"
	ChainOutput     = "TRELLIS_OUTPUT"
	ChainRedirect   = "TRELLIS_REDIRECT"
)

// Config is what to redirect.
type Config struct {
	ProxyUID     uint32
	InboundPort  uint16
	OutboundPort uint16
	// ExcludeInboundPorts are not captured inbound (the sidecar's own
	// ports 15000-15021 are always excluded).
	ExcludeInboundPorts []uint16
	// ExcludeOutboundPorts and ExcludeOutboundCIDRs are not captured outbound.
	ExcludeOutboundPorts []uint16
	ExcludeOutboundCIDRs []netip.Prefix
}

// The source addresses of the sidecar's connections from its inbound side
// to the application (the translator's inbound clusters bind them), told
// apart by these rules from the sidecar calling its own pod IP.
const (
	InboundBindIPv4 = "127.0.0.6"
	InboundBindIPv6 = "::1"
)

// Defaults are the ports of the design: 15001 out, 15006 in, UID 1337.
func Defaults() Config {
	return Config{ProxyUID: 1337, InboundPort: 15006, OutboundPort: 15001}
}

func ports(ps []uint16) []uint16 {
	out := slices.Clone(ps)
	slices.Sort(out)
	return slices.Compact(out)
}

// Rules returns the iptables-restore input for the nat table, for IPv4 or
// IPv6. The chain declarations flush Trellis's chains, so with --noflush the
// input can be applied again without duplicating them; the jumps from the
// built-in chains are added by Apply only when missing.
func Rules(c Config, ipv6 bool) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	loopback, bind := "127.0.0.1/32", InboundBindIPv4+"/32"
	if ipv6 {
		loopback, bind = "::1/128", InboundBindIPv6+"/128"
	}
	w("*nat")
	for _, ch := range []string{ChainInbound, ChainInRedirect, ChainOutput, ChainRedirect} {
		w(":%s - [0:0]", ch)
	}
	w("-A %s -p tcp -j REDIRECT --to-ports %d", ChainInRedirect, c.InboundPort)
	w("-A %s -p tcp -j REDIRECT --to-ports %d", ChainRedirect, c.OutboundPort)
	// Inbound: the sidecar's own ports (admin, stats, readiness) and excluded ports pass.
	w("-A %s -p tcp --dport 15000:15021 -j RETURN", ChainInbound)
	for _, p := range ports(c.ExcludeInboundPorts) {
		w("-A %s -p tcp --dport %d -j RETURN", ChainInbound, p)
	}
	w("-A %s -p tcp -j %s", ChainInbound, ChainInRedirect)
	// Outbound, in Istio's order. The inbound side's connection to the
	// application comes from InboundBindIPv4/IPv6 over lo: it reaches the
	// application. The sidecar's own connection to its own pod IP (a call
	// through a Service whose endpoint is this pod) goes through the inbound
	// side, so inbound mTLS and policy apply to it too. The application
	// calling its own pod IP reaches itself directly. Every other connection
	// of the sidecar leaves as it is.
	w("-A %s -s %s -o lo -j RETURN", ChainOutput, bind)
	w("-A %s -o lo ! -d %s -p tcp -m owner --uid-owner %d -j %s", ChainOutput, loopback, c.ProxyUID, ChainInRedirect)
	w("-A %s -o lo -m owner ! --uid-owner %d -j RETURN", ChainOutput, c.ProxyUID)
	w("-A %s -m owner --uid-owner %d -j RETURN", ChainOutput, c.ProxyUID)
	w("-A %s -d %s -j RETURN", ChainOutput, loopback)
	for _, p := range ports(c.ExcludeOutboundPorts) {
		w("-A %s -p tcp --dport %d -j RETURN", ChainOutput, p)
	}
	for _, cidr := range c.ExcludeOutboundCIDRs {
		if cidr.Addr().Is6() == ipv6 {
			w("-A %s -d %s -j RETURN", ChainOutput, cidr.Masked())
		}
	}
	w("-A %s -p tcp -j %s", ChainOutput, ChainRedirect)
	w("COMMIT")
	return b.String()
}

// jumps are the rules in built-in chains that enter Trellis's chains.
var jumps = []struct{ chain, spec string }{
	{"PREROUTING", "-p tcp -j " + ChainInbound},
	{"OUTPUT", "-p tcp -j " + ChainOutput},
}

// Runner runs the iptables tools of one backend ("iptables" or
// "iptables-legacy", and the ip6tables equivalents).
type Runner struct {
	Prefix string // "iptables", "ip6tables", "iptables-legacy", ...
}

func (r Runner) run(name string, stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.Command(r.Prefix+name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s%s %s: %w: %s", r.Prefix, name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Save returns iptables-save -t nat.
func (r Runner) Save() (string, error) {
	out, err := r.run("-save", nil, "-t", "nat")
	return string(out), err
}

// Apply installs the rules atomically (one iptables-restore transaction).
// Trellis's chains are replaced; the jumps into them are added only if they
// are not there yet, so running twice leaves the same rules.
func (r Runner) Apply(c Config, ipv6 bool) error {
	saved, err := r.Save()
	if err != nil {
		return err
	}
	_, err = r.run("-restore", []byte(RestoreInput(c, ipv6, saved)), "--noflush")
	return err
}

// RestoreInput is what Apply feeds iptables-restore --noflush in a
// namespace whose nat table is saved (iptables-save -t nat): Trellis's
// chains, and the jumps from PREROUTING and OUTPUT that saved lacks. With
// saved empty (a new pod) it is what trellis-init --dry-run prints.
func RestoreInput(c Config, ipv6 bool, saved string) string {
	var extra strings.Builder
	for _, j := range jumps {
		if !strings.Contains(saved, "-A "+j.chain+" "+j.spec) {
			fmt.Fprintf(&extra, "-A %s %s\n", j.chain, j.spec)
		}
	}
	return strings.Replace(Rules(c, ipv6), "COMMIT\n", extra.String()+"COMMIT\n", 1)
}
