package translate_test

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/internal/testenv"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

var update = flag.Bool("update", false, "rewrite the golden *.out.yaml files and remove orphans")

// translateCase builds the model of a test case and translates it for the
// case's proxy.
func translateCase(t testing.TB, path string) (*translate.Resources, []model.Problem, *model.Mesh) {
	t.Helper()
	in, h, err := manifest.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	mesh, problems := model.Build(in)
	ns, name, ok := strings.Cut(h.Proxy, "/")
	if !ok {
		t.Fatalf("%s: header proxy %q is not namespace/pod", path, h.Proxy)
	}
	w := mesh.Workload(ns, name)
	if w == nil {
		t.Fatalf("%s: proxy pod %s is not in the input", path, h.Proxy)
	}
	res, tp := translate.ForWorkload(mesh, w)
	for _, name := range h.OnDemand {
		c, ok := translate.PodIPCluster(mesh, name)
		if !ok {
			t.Fatalf("%s: on-demand cluster %q does not resolve", path, name)
		}
		res.Clusters = append(res.Clusters, c)
	}
	slices.SortFunc(res.Clusters, func(a, b *clusterv3.Cluster) int { return strings.Compare(a.Name, b.Name) })
	return res, append(problems, tp...), mesh
}

func render(t testing.TB, res *translate.Resources, problems []model.Problem) []byte {
	t.Helper()
	enc := protojson.MarshalOptions{UseProtoNames: true}
	conv := func(m proto.Message) any {
		b, err := enc.Marshal(m)
		if err != nil {
			t.Fatalf("protojson: %v", err)
		}
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	out := map[string]any{}
	if len(problems) > 0 {
		out["problems"] = problems
	}
	var ls, rs, cs, es []any
	for _, l := range res.Listeners {
		ls = append(ls, conv(l))
	}
	for _, r := range res.Routes {
		rs = append(rs, conv(r))
	}
	for _, c := range res.Clusters {
		cs = append(cs, conv(c))
	}
	for _, e := range res.Endpoints {
		es = append(es, conv(e))
	}
	out["listeners"], out["routes"], out["clusters"], out["endpoints"], out["secrets"] = ls, rs, cs, es, res.Secrets
	b, err := yaml.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGolden translates every testdata/<case>.in.yaml and compares with
// <case>.out.yaml. Every output also passes ValidateAll and the
// cross-reference check, and translating twice gives identical resources.
func TestGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	want := map[string]bool{}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in.yaml")
		outPath := filepath.Join("testdata", name+".out.yaml")
		want[outPath] = true
		t.Run(name, func(t *testing.T) {
			res, problems, _ := translateCase(t, in)
			if err := res.Validate(); err != nil {
				t.Errorf("ValidateAll: %v", err)
			}
			if err := translate.CheckReferences(res); err != nil {
				t.Errorf("CheckReferences: %v", err)
			}
			again, _, _ := translateCase(t, in)
			if !resourcesEqual(res, again) {
				t.Errorf("two translations of the same input differ")
			}
			got := render(t, res, problems)
			if *update {
				if err := os.WriteFile(outPath, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			wantOut, err := os.ReadFile(outPath)
			if err != nil {
				t.Fatalf("%v (run go test ./pkg/translate -update)", err)
			}
			if diff := cmp.Diff(string(wantOut), string(got)); diff != "" {
				t.Errorf("%s differs (-want +got; run with -update after reading the diff):\n%s", outPath, diff)
			}
		})
	}
	testenv.GoldenOrphans(t, "testdata/*.out.yaml", want, *update)
}

func resourcesEqual(a, b *translate.Resources) bool {
	if len(a.Listeners) != len(b.Listeners) || len(a.Routes) != len(b.Routes) || len(a.Clusters) != len(b.Clusters) || len(a.Endpoints) != len(b.Endpoints) {
		return false
	}
	opts := proto.MarshalOptions{Deterministic: true}
	same := func(x, y proto.Message) bool {
		bx, _ := opts.Marshal(x)
		by, _ := opts.Marshal(y)
		return string(bx) == string(by)
	}
	for i := range a.Listeners {
		if !same(a.Listeners[i], b.Listeners[i]) {
			return false
		}
	}
	for i := range a.Routes {
		if !same(a.Routes[i], b.Routes[i]) {
			return false
		}
	}
	for i := range a.Clusters {
		if !same(a.Clusters[i], b.Clusters[i]) {
			return false
		}
	}
	for i := range a.Endpoints {
		if !same(a.Endpoints[i], b.Endpoints[i]) {
			return false
		}
	}
	return true
}
