package translate_test

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// forbiddenImports are the API packages the translator must not read: it
// translates the resolved model (pkg/model), which alone parses, defaults
// and validates the Kubernetes objects and reports their problems.
var forbiddenImports = []string{
	"github.com/trellis-mesh/trellis/pkg/apis",
	"sigs.k8s.io/gateway-api",
	"k8s.io/api",
}

// TestTranslatorImportsNoAPIPackage: no non-test file of pkg/translate or
// pkg/translate/simulate imports an API package (tests may, to build
// inputs through model.Build).
func TestTranslatorImportsNoAPIPackage(t *testing.T) {
	checked := 0
	for _, dir := range []string{".", "simulate"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			ast, err := parser.ParseFile(token.NewFileSet(), f, src, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			checked++
			for _, imp := range ast.Imports {
				path, _ := strconv.Unquote(imp.Path.Value)
				for _, bad := range forbiddenImports {
					if path == bad || strings.HasPrefix(path, bad+"/") {
						t.Errorf("%s imports %s: the translator reads only pkg/model (resolve the field in model.Build and add it to the model)", f, path)
					}
				}
			}
		}
	}
	if checked < 10 {
		t.Fatalf("checked %d files; the package layout changed and this test no longer looks at the translator", checked)
	}
}
