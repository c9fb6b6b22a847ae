package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trellis-mesh/trellis/internal/testenv"
)

// cmdBinaries builds every command under cmd/ once, with one go build,
// into a directory shared by this package's tests, and returns it.
var cmdBinaries = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "trellis-cmd-test")
	if err != nil {
		return "", err
	}
	builtDir = dir
	if out, err := exec.Command("go", "build", "-o", dir+"/", "github.com/trellis-mesh/trellis/cmd/...").CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/...: %v: %s", err, out)
	}
	return dir, nil
})

// cmdBinary is the built binary of cmd/<name>.
func cmdBinary(t *testing.T, name string) string {
	t.Helper()
	dir, err := cmdBinaries()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

// builtDir is cmdBinaries' directory once made, removed after the tests.
var builtDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if builtDir != "" {
		_ = os.RemoveAll(builtDir)
	}
	os.Exit(code)
}

// TestHelpExitsZero: asking for the usage is no failure (trellis-init
// exited 1 printing "flag: help requested"); an unknown flag still fails.
// Every binary under cmd/ is built and run as a user would run it.
func TestHelpExitsZero(t *testing.T) {
	for _, cmd := range []string{"trellis-init", "trellis-controller", "trellisctl"} {
		bin := cmdBinary(t, cmd)
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

// TestREADMEFlagsTable: the README's trellis-controller flags table names
// every flag `trellis-controller --help` prints and no other, and where a
// row documents one flag with one default, the default is --help's.
func TestREADMEFlagsTable(t *testing.T) {
	help, err := exec.Command(cmdBinary(t, "trellis-controller"), "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("--help: %v\n%s", err, help)
	}
	// "  -name type\n    \tusage (default "x")" blocks.
	flags := map[string]string{} // name -> default ("" when none printed)
	name := ""
	for _, line := range strings.Split(string(help), "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			name, _, _ = strings.Cut(rest, " ")
			flags[name] = ""
			continue
		}
		if name == "" {
			continue
		}
		if _, d, ok := strings.Cut(line, "(default "); ok {
			flags[name] = strings.Trim(strings.TrimSuffix(strings.TrimSpace(d), ")"), `"`)
		}
	}
	if len(flags) < 10 {
		t.Fatalf("parsed %d flags from --help:\n%s", len(flags), help)
	}
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := testenv.MarkdownTable(string(readme), "| flag | default | what |")
	if len(rows) == 0 {
		t.Fatal(`README has no "| flag | default | what |" table`)
	}
	documented := map[string]bool{}
	for _, r := range rows {
		names := testenv.CodeSpans(r[0])
		for _, n := range names {
			n = strings.TrimPrefix(n, "--")
			documented[n] = true
			if _, ok := flags[n]; !ok {
				t.Errorf("README documents --%s, which trellis-controller does not have", n)
			}
		}
		defaults := testenv.CodeSpans(r[1])
		if len(names) != 1 || len(defaults) != 1 || strings.Contains(r[1], ",") {
			continue
		}
		n, want := strings.TrimPrefix(names[0], "--"), flags[strings.TrimPrefix(names[0], "--")]
		got := defaults[0]
		if d, err := time.ParseDuration(got); err == nil {
			if w, err := time.ParseDuration(want); err == nil {
				got, want = d.String(), w.String()
			}
		}
		if want != "" && got != want {
			t.Errorf("README says --%s defaults to %q, --help says %q", n, defaults[0], want)
		}
	}
	for n := range flags {
		if !documented[n] {
			t.Errorf("--%s is not in README's flags table", n)
		}
	}
}
