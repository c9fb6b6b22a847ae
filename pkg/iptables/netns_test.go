package iptables_test

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/trellis-mesh/trellis/pkg/iptables"
)

// The test re-executes its own binary inside network namespaces as a small
// TCP server or client (TRELLIS_IPT_HELPER), so every connection is real.
func TestMain(m *testing.M) {
	switch os.Getenv("TRELLIS_IPT_HELPER") {
	case "listen":
		listen(os.Getenv("TRELLIS_IPT_NAME"), strings.Split(os.Getenv("TRELLIS_IPT_ADDRS"), ","))
	case "dial":
		dial(os.Getenv("TRELLIS_IPT_ADDR"), os.Getenv("TRELLIS_IPT_UID"))
	default:
		os.Exit(m.Run())
	}
}

// listen answers each connection with "<name>:<port> <original destination>"
// ("-" when conntrack knows none, i.e. no NAT in that namespace).
func listen(name string, addrs []string) {
	for _, a := range addrs {
		l, err := net.Listen("tcp4", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				_, port, _ := net.SplitHostPort(l.Addr().String())
				fmt.Fprintf(c, "%s:%s %s\n", name, port, originalDst(c.(*net.TCPConn)))
				c.Close()
			}
		}()
	}
	fmt.Println("READY")
	select {}
}

// originalDst reads SO_ORIGINAL_DST, where iptables REDIRECT keeps the
// address the client dialled ("-" when the connection was not redirected).
func originalDst(c *net.TCPConn) string {
	raw, err := c.SyscallConn()
	if err != nil {
		return "-"
	}
	var out string = "-"
	_ = raw.Control(func(fd uintptr) {
		var addr syscall.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(addr))
		const soOriginalDst = 80
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_IP, soOriginalDst, uintptr(unsafe.Pointer(&addr)), uintptr(unsafe.Pointer(&size)), 0)
		if errno == 0 {
			port := int(addr.Port>>8) | int(addr.Port&0xff)<<8
			out = fmt.Sprintf("%d.%d.%d.%d:%d", addr.Addr[0], addr.Addr[1], addr.Addr[2], addr.Addr[3], port)
		}
	})
	return out
}

func dial(addr, uid string) {
	if uid != "" {
		u, _ := strconv.Atoi(uid)
		if err := syscall.Setuid(u); err != nil {
			fmt.Println("setuid:", err)
			os.Exit(1)
		}
	}
	d := net.Dialer{Timeout: 3 * time.Second}
	if src, dst, ok := strings.Cut(addr, ">"); ok { // source>destination
		d.LocalAddr, addr = &net.TCPAddr{IP: net.ParseIP(src)}, dst
	}
	c, err := d.Dial("tcp4", addr)
	if err != nil {
		fmt.Println("dial error:", err)
		os.Exit(0)
	}
	defer c.Close()
	line, _ := bufio.NewReader(c).ReadString('\n')
	fmt.Print(line)
}

type netns struct {
	t    *testing.T
	name string
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (n netns) exec(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
}

func (n netns) helper(t *testing.T, env ...string) *exec.Cmd {
	self, _ := os.Executable()
	cmd := n.exec(self)
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// startListener runs a listener helper in the namespace until the test ends.
func (n netns) startListener(t *testing.T, name string, addrs ...string) {
	cmd := n.helper(t, "TRELLIS_IPT_HELPER=listen", "TRELLIS_IPT_NAME="+name, "TRELLIS_IPT_ADDRS="+strings.Join(addrs, ","))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() || sc.Text() != "READY" {
		t.Fatalf("listener %s did not start: %q", name, sc.Text())
	}
}

func (n netns) dial(t *testing.T, addr string, uid int) string {
	out, err := n.helper(t, "TRELLIS_IPT_HELPER=dial", "TRELLIS_IPT_ADDR="+addr, "TRELLIS_IPT_UID="+strconv.Itoa(uid)).CombinedOutput()
	if err != nil {
		t.Fatalf("dial %s: %v: %s", addr, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestRedirectionInANetworkNamespace runs trellis-init in a real network
// namespace (a "pod" with a veth to a "peer") and checks where real TCP
// connections land.
func TestRedirectionInANetworkNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root to create network namespaces (make test runs as root in CI)")
	}
	for _, tool := range []string{"ip", "iptables-restore", "iptables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIP: %s not found; install iproute2 and iptables (make test does when run as root)", tool)
		}
	}
	bin := filepath.Join(t.TempDir(), "trellis-init")
	run(t, "go", "build", "-o", bin, "github.com/trellis-mesh/trellis/cmd/trellis-init")

	suffix := strconv.Itoa(rand.IntN(1 << 20))
	pod, peer := netns{t, "trellis-pod-" + suffix}, netns{t, "trellis-peer-" + suffix}
	for _, ns := range []netns{pod, peer} {
		run(t, "ip", "netns", "add", ns.name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns.name).Run() })
		run(t, "ip", "-n", ns.name, "link", "set", "lo", "up")
	}
	vp, vq := "tp"+suffix, "tq"+suffix
	run(t, "ip", "link", "add", vp, "netns", pod.name, "type", "veth", "peer", "name", vq, "netns", peer.name)
	run(t, "ip", "-n", pod.name, "addr", "add", "10.250.0.2/24", "dev", vp)
	run(t, "ip", "-n", peer.name, "addr", "add", "10.250.0.1/24", "dev", vq)
	run(t, "ip", "-n", pod.name, "link", "set", vp, "up")
	run(t, "ip", "-n", peer.name, "link", "set", vq, "up")

	pod.startListener(t, "pod", "0.0.0.0:15001", "0.0.0.0:15006", "0.0.0.0:8080", "0.0.0.0:15021")
	peer.startListener(t, "peer", "10.250.0.1:7000", "10.250.0.1:5432")

	out, err := pod.exec(bin, "--exclude-outbound-ports", "5432").CombinedOutput()
	if err != nil {
		t.Fatalf("trellis-init: %v: %s", err, out)
	}
	t.Logf("%s", out)

	for _, tt := range []struct {
		name string
		from netns
		uid  int
		addr string
		want string
	}{
		{"an application's connection to any address lands on 15001 with its original destination", pod, 1000, "10.250.0.99:80", "pod:15001 10.250.0.99:80"},
		{"an application's connection to the peer is redirected too", pod, 1000, "10.250.0.1:7000", "pod:15001 10.250.0.1:7000"},
		{"the sidecar's own connection (UID 1337) is not redirected", pod, 1337, "10.250.0.1:7000", "peer:7000 -"},
		{"an excluded outbound port bypasses the sidecar", pod, 1000, "10.250.0.1:5432", "peer:5432 -"},
		{"inbound traffic to the pod lands on 15006 with its original destination", peer, 0, "10.250.0.2:8080", "pod:15006 10.250.0.2:8080"},
		// Not redirected: it reaches the 15021 listener itself (conntrack,
		// active in this namespace, reports the unchanged destination).
		{"the sidecar's readiness port is not captured inbound", peer, 0, "10.250.0.2:15021", "pod:15021 10.250.0.2:15021"},
		// Both land on 8080 itself, not redirected (conntrack reports the
		// unchanged destination, as for 15021).
		{"an application calling its own pod IP reaches itself directly", pod, 1000, "10.250.0.2:8080", "pod:8080 10.250.0.2:8080"},
		{"the sidecar calling its own pod IP goes through the inbound side", pod, 1337, "10.250.0.2:8080", "pod:15006 10.250.0.2:8080"},
		{"the sidecar's inbound side reaches the application from 127.0.0.6", pod, 1337, "127.0.0.6>10.250.0.2:8080", "pod:8080 10.250.0.2:8080"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.from.dial(t, tt.addr, tt.uid); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}

	// Running it again changes nothing.
	counters := regexp.MustCompile(`(?m)^#.*$|\[\d+:\d+\]`)
	save := func() string {
		out, err := pod.exec("iptables-save", "-t", "nat").CombinedOutput()
		if err != nil {
			t.Fatal(err)
		}
		return counters.ReplaceAllString(string(out), "")
	}
	before := save()
	if out, err := pod.exec(bin, "--exclude-outbound-ports", "5432").CombinedOutput(); err != nil {
		t.Fatalf("second run: %v: %s", err, out)
	}
	if after := save(); after != before {
		t.Errorf("a second run changed the rules:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if !strings.Contains(before, iptables.ChainOutput) {
		t.Errorf("rules not found in iptables-save:\n%s", before)
	}

	// --dry-run prints exactly what the real run applies: restored into a
	// new namespace, it gives the same table.
	dry := netns{t, "trellis-dry-" + suffix}
	run(t, "ip", "netns", "add", dry.name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", dry.name).Run() })
	printed, err := dry.exec(bin, "--dry-run", "--ipv6=false", "--exclude-outbound-ports", "5432").Output()
	if err != nil {
		t.Fatalf("--dry-run: %v", err)
	}
	restore := dry.exec("iptables-restore", "--noflush")
	restore.Stdin = bytes.NewReader(printed)
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("iptables-restore of the --dry-run output: %v: %s", err, out)
	}
	out, err = dry.exec("iptables-save", "-t", "nat").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if got := counters.ReplaceAllString(string(out), ""); got != before {
		t.Errorf("--dry-run's rules differ from what trellis-init applied:\ndry-run:\n%s\napplied:\n%s", got, before)
	}
}

func TestDryRunRulesAreStable(t *testing.T) {
	c := iptables.Defaults()
	c.ExcludeInboundPorts = []uint16{9090, 9090, 8081}
	got := iptables.Rules(c, false)
	for _, want := range []string{
		"-A TRELLIS_INBOUND -p tcp --dport 8081 -j RETURN\n-A TRELLIS_INBOUND -p tcp --dport 9090 -j RETURN\n",
		"-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
		"-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
		"-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("rules lack %q:\n%s", want, got)
		}
	}
	if strings.Count(got, "--dport 9090") != 1 {
		t.Error("duplicate excluded ports are not merged")
	}
}
