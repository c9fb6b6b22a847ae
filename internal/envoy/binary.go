package envoy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/trellis-mesh/trellis/internal/testenv"
)

// Version is the Envoy release Trellis is built and tested against; it
// matches the pinned go-control-plane/envoy API module.
const Version = "1.40.0"

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// Binary returns the path of a stock Envoy Version: ENVOY_BINARY when set,
// else bin/envoy in the checkout, obtained by hack/envoy.sh when missing
// (so `go test` works without `make`). It never reports "not found" as a
// reason to skip: a test that needs Envoy fails without it.
func Binary() (string, error) {
	binOnce.Do(func() { binPath, binErr = binary() })
	return binPath, binErr
}

func binary() (string, error) {
	root, err := testenv.RepoRoot()
	if err != nil {
		return "", err
	}
	path := os.Getenv("ENVOY_BINARY")
	if path == "" {
		path = filepath.Join(root, "bin", "envoy")
		if _, err := os.Stat(path); err != nil {
			cmd := exec.Command("bash", filepath.Join(root, "hack", "envoy.sh"))
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Run(); err != nil {
				return "", fmt.Errorf("obtain envoy with hack/envoy.sh: %w\n%s", err, out.String())
			}
		}
	}
	out, err := exec.Command(path, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w: %s", path, err, out)
	}
	if !strings.Contains(string(out), "/"+Version+"/") {
		return "", fmt.Errorf("%s is not Envoy %s: %s", path, Version, strings.TrimSpace(string(out)))
	}
	return path, nil
}
