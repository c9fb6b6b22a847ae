package controlplane_test

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

// TestPprofAddr: --pprof-bind-address serves Go's profiles on the address
// given; by default nothing does.
func TestPprofAddr(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	get := func() (string, error) {
		resp, err := http.Get("http://" + addr + "/debug/pprof/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if d := controlplane.Defaults().PprofAddr; d != "" && d != "0" {
		t.Errorf("pprof is on by default (%q)", d)
	}
	startPlane(t, nil, func(o *controlplane.Options) { o.PprofAddr = addr })
	deadline := time.Now().Add(30 * time.Second)
	for {
		body, err := get()
		if err == nil && strings.Contains(body, "goroutine") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no profiles on %s: %v %.200s", addr, err, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
