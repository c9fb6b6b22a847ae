// Package images checks the container image recipes in images/: each
// Dockerfile builds an existing command into a static binary (its own go
// build line, run here) that reports the version stamped into it, and the
// controller image runs as non-root. The images themselves are built with
// `make images` (docker or podman; not available on the CI machine).
package images

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var buildLine = regexp.MustCompile(`CGO_ENABLED=0 go build -trimpath -ldflags="([^"]*)"\s+-o (/out/[a-z-]+) (\./cmd/[a-z-]+)`)

func dockerfile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(name, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	// Join continuation lines, as the Dockerfile parser does.
	return strings.ReplaceAll(string(b), "\\\n", " ")
}

func TestDockerfilesBuildStaticVersionedBinaries(t *testing.T) {
	for _, tc := range []struct{ dir, binary, user string }{
		{"controller", "trellis-controller", "65532:65532"},
		{"init", "trellis-init", ""},
	} {
		t.Run(tc.dir, func(t *testing.T) {
			df := dockerfile(t, tc.dir)
			m := buildLine.FindStringSubmatch(df)
			if m == nil {
				t.Fatalf("no static go build line in %s/Dockerfile", tc.dir)
			}
			ldflags, out, pkg := m[1], m[2], m[3]
			if filepath.Base(out) != tc.binary || filepath.Base(pkg) != tc.binary {
				t.Errorf("builds %s from %s, want %s", out, pkg, tc.binary)
			}
			if !strings.Contains(df, "ENTRYPOINT [\"/usr/local/bin/"+tc.binary+"\"]") || !strings.Contains(df, "COPY --from=build "+out+" /usr/local/bin/"+tc.binary) {
				t.Error("the entrypoint is not the built binary")
			}
			if tc.user != "" && !strings.Contains(df, "\nUSER "+tc.user+"\n") {
				t.Errorf("the image does not run as %s", tc.user)
			}
			bin := filepath.Join(t.TempDir(), tc.binary)
			ldflags = strings.ReplaceAll(ldflags, "${VERSION}", "v9.9.9-test")
			cmd := exec.Command("go", "build", "-trimpath", "-ldflags="+ldflags, "-o", bin, pkg)
			cmd.Dir = ".."
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("the Dockerfile's build fails: %v\n%s", err, b)
			}
			f, err := elf.Open(bin)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, p := range f.Progs {
				if p.Type == elf.PT_INTERP {
					t.Error("the binary is dynamically linked")
				}
			}
			got, err := exec.Command(bin, "--version").Output()
			if err != nil {
				t.Fatal(err)
			}
			if want := tc.binary + " v9.9.9-test\n"; string(got) != want {
				t.Errorf("--version = %q, want %q (the VERSION build arg does not reach the binary)", got, want)
			}
		})
	}
}
