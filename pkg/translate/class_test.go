package translate_test

import (
	"path/filepath"
	"testing"

	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// TestClassKeyDecidesTheResult checks the contract the xDS server relies on:
// within every golden input, workloads with the same class key get
// identical resources, and workloads that differ in what they serve or who
// they are get different keys.
func TestClassKeyDecidesTheResult(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.in.yaml")
	shared := 0
	for _, f := range files {
		in, _, err := manifest.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		mesh, _ := model.Build(in)
		byKey := map[string]*translate.Resources{}
		for _, w := range mesh.Workloads {
			res, _ := translate.ForWorkload(mesh, w)
			key := translate.ClassKey(mesh, w)
			if prev, ok := byKey[key]; ok {
				shared++
				if !resourcesEqual(prev, res) {
					t.Errorf("%s: %s/%s shares class %s but gets different resources", filepath.Base(f), w.Namespace, w.Name, key)
				}
			}
			byKey[key] = res
		}
	}
	if shared == 0 {
		t.Error("no golden input has two workloads sharing a class; the test proves nothing")
	}
	load := func(name string) *model.Mesh {
		in, _, err := manifest.ReadFile("testdata/" + name + ".in.yaml")
		if err != nil {
			t.Fatal(err)
		}
		mesh, _ := model.Build(in)
		return mesh
	}
	mesh := load("accesspolicy-allow")
	r1, r2, fe := mesh.Workload("shop", "reviews-v1-1"), mesh.Workload("shop", "reviews-v2-1"), mesh.Workload("shop", "frontend-1")
	if translate.ClassKey(mesh, r1) != translate.ClassKey(mesh, r2) {
		t.Error("two pods of one ServiceAccount serving the same Service should share a class")
	}
	if translate.ClassKey(mesh, r1) == translate.ClassKey(mesh, fe) {
		t.Error("a client and a server of different ServiceAccounts must not share a class")
	}
	mesh = load("app-probes")
	if translate.ClassKey(mesh, mesh.Workload("shop", "reviews-1")) != translate.ClassKey(mesh, mesh.Workload("shop", "reviews-2")) {
		t.Error("replicas with the same probes should share a class")
	}
	if translate.ClassKey(mesh, mesh.Workload("shop", "reviews-1")) == translate.ClassKey(mesh, mesh.Workload("shop", "reviews-3")) {
		t.Error("pods whose probes differ must not share a class (the stats listener differs)")
	}
	mesh = load("basic-http-and-tcp")
	if translate.ClassKey(mesh, mesh.Workload("shop", "reviews-1")) == translate.ClassKey(mesh, mesh.Workload("shop", "reviews-2")) {
		t.Error("replicas in different zones must not share a class (locality failover differs)")
	}
}
