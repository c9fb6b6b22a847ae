package analyze_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/pkg/analyze"
)

// FuzzAnalyze: any manifest bytes load and analyse without a panic, and
// every finding names where it is (an object or a document) and why.
func FuzzAnalyze(f *testing.F) {
	seeds, _ := filepath.Glob("../../cmd/trellisctl/testdata/broken/*.yaml")
	samples, _ := filepath.Glob("../../config/samples/*/*.yaml")
	for _, p := range append(seeds, samples...) {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("kind: Service\napiVersion: v1\nmetadata: {name: x}\nspec: {selector: {a: b}, ports: [{port: 80, targetPort: name}]}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "m.yaml"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		objs, findings, err := analyze.Load([]string{dir}, "default", strings.NewReader(""))
		if err != nil {
			t.Fatal(err)
		}
		rep := analyze.Run(objs, analyze.Options{AssumeInjection: true})
		for _, fd := range append(findings, rep.Findings...) {
			if fd.Reason == "" || fd.Message == "" || (fd.Object.Kind == "" && fd.Source == "") {
				t.Errorf("finding without reason, message or place: %+v", fd)
			}
		}
	})
}
