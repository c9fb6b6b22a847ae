package model_test

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/internal/testenv"
	"github.com/trellis-mesh/trellis/pkg/model"
)

var update = flag.Bool("update", false, "rewrite testdata/*.model.yaml and remove orphans")

// goldenInputs are the translator's golden inputs: the model layer and the
// translator layer see the same objects, so a change in what Build makes of
// them shows here first, without Envoy's configuration around it.
const goldenInputs = "../translate/testdata"

// TestGolden builds the model of every ../translate/testdata/<case>.in.yaml
// and compares it, with Build's problems, with testdata/<case>.model.yaml
// (-update rewrites them).
func TestGolden(t *testing.T) {
	inputs, err := filepath.Glob(filepath.Join(goldenInputs, "*.in.yaml"))
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs in %s: %v", goldenInputs, err)
	}
	want := map[string]bool{}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in.yaml")
		outPath := filepath.Join("testdata", name+".model.yaml")
		want[outPath] = true
		t.Run(name, func(t *testing.T) {
			input, _, err := manifest.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			got := renderModel(t, input)
			if again := renderModel(t, input); string(again) != string(got) {
				t.Error("two builds of the same input differ")
			}
			if *update {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(outPath, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			wantOut, err := os.ReadFile(outPath)
			if err != nil {
				t.Fatalf("%v (run go test ./pkg/model -update)", err)
			}
			if diff := cmp.Diff(string(wantOut), string(got)); diff != "" {
				t.Errorf("%s differs (-want +got; run with -update after reading the diff):\n%s", outPath, diff)
			}
		})
	}
	testenv.GoldenOrphans(t, "testdata/*.model.yaml", want, *update)
}

func renderModel(t *testing.T, in model.Input) []byte {
	t.Helper()
	mesh, problems := model.Build(in)
	b, err := yaml.Marshal(struct {
		Problems []model.Problem `json:"problems,omitempty"`
		Mesh     *model.Mesh     `json:"mesh"`
	}{problems, mesh})
	if err != nil {
		t.Fatal(err)
	}
	return b
}
