package main

import (
	"os/exec"
	"path/filepath"
	"testing"
)

// TestHelpExitsZero: asking for the usage is no failure (trellis-init
// exited 1 printing "flag: help requested"); an unknown flag still fails.
// Both binaries are built and run as a user would run them.
func TestHelpExitsZero(t *testing.T) {
	dir := t.TempDir()
	for _, cmd := range []string{"trellis-init", "trellis-controller"} {
		bin := filepath.Join(dir, cmd)
		if out, err := exec.Command("go", "build", "-o", bin, "github.com/trellis-mesh/trellis/cmd/"+cmd).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v: %s", cmd, err, out)
		}
		for _, help := range []string{"--help", "-h"} {
			out, err := exec.Command(bin, help).CombinedOutput()
			if err != nil {
				t.Errorf("%s %s: %v\n%s", cmd, help, err, out)
			}
			if len(out) == 0 {
				t.Errorf("%s %s printed no usage", cmd, help)
			}
		}
		if err := exec.Command(bin, "--no-such-flag").Run(); err == nil {
			t.Errorf("%s --no-such-flag succeeded", cmd)
		}
	}
}
