// Command trellis-init is the init container Trellis injects: it programs
// the pod's network namespace so inbound TCP reaches the sidecar on 15006
// and outbound TCP on 15001 (pkg/iptables). It needs the NET_ADMIN and
// NET_RAW capabilities, not privileged mode. --dry-run prints the
// iptables-restore input it would apply in a new pod.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/trellis-mesh/trellis/pkg/iptables"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "trellis-init: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	c := iptables.Defaults()
	fs := flag.NewFlagSet("trellis-init", flag.ContinueOnError)
	uid := fs.Uint("proxy-uid", uint(c.ProxyUID), "UID the sidecar runs as; its traffic is not redirected")
	in := fs.Uint("inbound-port", uint(c.InboundPort), "port of the sidecar's inbound listener")
	out := fs.Uint("outbound-port", uint(c.OutboundPort), "port of the sidecar's outbound listener")
	exIn := fs.String("exclude-inbound-ports", "", "comma-separated ports not redirected inbound (15000-15021 always are not)")
	exOut := fs.String("exclude-outbound-ports", "", "comma-separated ports not redirected outbound")
	exCIDR := fs.String("exclude-outbound-cidrs", "", "comma-separated CIDRs not redirected outbound")
	backend := fs.String("backend", "auto", "iptables backend: auto, nft or legacy")
	ipv6 := fs.String("ipv6", "auto", "also program ip6tables: auto (if the pod has an IPv6 address), true or false")
	dry := fs.Bool("dry-run", false, "print the rules instead of applying them")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil // the usage was printed; asking for it is no failure
		}
		return err
	}
	if *showVersion {
		fmt.Println("trellis-init", version)
		return nil
	}
	c.ProxyUID, c.InboundPort, c.OutboundPort = uint32(*uid), uint16(*in), uint16(*out)
	var err error
	if c.ExcludeInboundPorts, err = parsePorts(*exIn); err != nil {
		return fmt.Errorf("--exclude-inbound-ports: %w", err)
	}
	if c.ExcludeOutboundPorts, err = parsePorts(*exOut); err != nil {
		return fmt.Errorf("--exclude-outbound-ports: %w", err)
	}
	for _, s := range split(*exCIDR) {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return fmt.Errorf("--exclude-outbound-cidrs: %w", err)
		}
		c.ExcludeOutboundCIDRs = append(c.ExcludeOutboundCIDRs, p)
	}
	v6 := *ipv6 == "true" || *ipv6 == "auto" && hasIPv6()
	if *dry {
		// What apply feeds iptables-restore in a new pod's namespace.
		fmt.Print(iptables.RestoreInput(c, false, ""))
		if v6 {
			fmt.Print(iptables.RestoreInput(c, true, ""))
		}
		return nil
	}
	prefix, err := pickBackend(*backend)
	if err != nil {
		return err
	}
	if err := apply(iptables.Runner{Prefix: "ip" + prefix}, c, false); err != nil {
		return err
	}
	if v6 {
		if err := apply(iptables.Runner{Prefix: "ip6" + prefix}, c, true); err != nil {
			return err
		}
	}
	fmt.Printf("trellis-init: redirected inbound TCP to %d and outbound TCP to %d (backend %s, IPv6 %v)\n", c.InboundPort, c.OutboundPort, "ip"+prefix, v6)
	return nil
}

func apply(r iptables.Runner, c iptables.Config, v6 bool) error {
	err := r.Apply(c, v6)
	if err != nil && (strings.Contains(err.Error(), "Permission denied") || strings.Contains(err.Error(), "Operation not permitted")) {
		return fmt.Errorf("%w\nthe container needs the NET_ADMIN and NET_RAW capabilities (and to run as root inside its user namespace)", err)
	}
	return err
}

// pickBackend chooses between the nft and legacy iptables: the one already
// holding rules in this namespace, else nft.
func pickBackend(b string) (string, error) {
	switch b {
	case "nft":
		return "tables-nft", nil
	case "legacy":
		return "tables-legacy", nil
	case "auto":
	default:
		return "", fmt.Errorf("--backend %q: want auto, nft or legacy", b)
	}
	if _, err := exec.LookPath("iptables-legacy-save"); err == nil {
		if out, err := exec.Command("iptables-legacy-save").Output(); err == nil && strings.Contains(string(out), "-A ") {
			return "tables-legacy", nil
		}
	}
	if _, err := exec.LookPath("iptables-nft-restore"); err == nil {
		return "tables-nft", nil
	}
	if _, err := exec.LookPath("iptables-restore"); err == nil {
		return "tables", nil
	}
	return "", errors.New("no iptables found: install the iptables package (iptables-restore)")
}

func hasIPv6() bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() == nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
			return true
		}
	}
	return false
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func parsePorts(s string) ([]uint16, error) {
	var out []uint16
	for _, p := range split(s) {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port", p)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}
