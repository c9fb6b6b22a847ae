package chart_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
)

// permission is one (scope, group, resource, resourceName, verb).
type permission struct{ scope, group, resource, name, verb string }

// generatedPermissions are the rules controller-gen wrote from the markers.
func generatedPermissions(t *testing.T) map[permission]bool {
	t.Helper()
	docs, err := localcluster.ReadManifests(filepath.Join(env.Root, "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[permission]bool{}
	for _, doc := range docs {
		var role rbacv1.ClusterRole // Role has the same rules
		if err := runtimeConvert(doc, &role); err != nil {
			t.Fatal(err)
		}
		scope := map[string]string{"ClusterRole": "cluster", "Role": "namespace"}[doc.GetKind()]
		for _, r := range role.Rules {
			names := r.ResourceNames
			if len(names) == 0 {
				names = []string{""}
			}
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					for _, n := range names {
						for _, v := range r.Verbs {
							out[permission{scope, g, res, n, v}] = true
						}
					}
				}
			}
		}
	}
	return out
}

// readmePermissions parses README's "Why each permission" table.
func readmePermissions(t *testing.T) map[permission]bool {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(env.Root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := testenv.MarkdownTable(string(raw), "| scope | API group | resources | verbs | why |")
	if len(rows) == 0 {
		t.Fatal(`README has no "| scope | API group | resources | verbs | why |" table (section "Why each permission")`)
	}
	out := map[permission]bool{}
	for _, cells := range rows {
		if len(cells) != 5 || (cells[0] != "cluster" && cells[0] != "namespace") {
			t.Errorf("README permission row is not scope | group | resources | verbs | why: %q", cells)
			continue
		}
		if cells[4] == "" {
			t.Errorf("README permission row without a reason: %q", cells)
		}
		group := cells[1]
		if group == "core" {
			group = ""
		}
		// "configmaps `trellis-root-ca` only" limits the row to that name.
		resources, name := cells[2], ""
		if before, after, ok := strings.Cut(resources, " `"); ok {
			resources, name = before, strings.TrimSuffix(after, "` only")
		}
		for _, res := range strings.Split(resources, ", ") {
			for _, v := range strings.Split(cells[3], ", ") {
				out[permission{cells[0], group, res, name, v}] = true
			}
		}
	}
	return out
}

// TestREADMEExplainsEveryPermission: the README's permission table lists
// exactly what the controller is granted, so a reviewer sees every grant
// with its reason.
func TestREADMEExplainsEveryPermission(t *testing.T) {
	gen, doc := generatedPermissions(t), readmePermissions(t)
	if len(gen) == 0 || len(doc) == 0 {
		t.Fatalf("parsed %d generated and %d documented permissions", len(gen), len(doc))
	}
	var missing, extra []string
	for p := range gen {
		if !doc[p] {
			missing = append(missing, strings.Join([]string{p.scope, p.group, p.resource, p.name, p.verb}, "/"))
		}
	}
	for p := range doc {
		if !gen[p] {
			extra = append(extra, strings.Join([]string{p.scope, p.group, p.resource, p.name, p.verb}, "/"))
		}
	}
	slices.Sort(missing)
	slices.Sort(extra)
	if len(missing) > 0 {
		t.Errorf("granted but not explained in README \"Why each permission\": %v", missing)
	}
	if len(extra) > 0 {
		t.Errorf("README explains permissions that are not granted: %v", extra)
	}
}

// TestREADMEValuesTable: the README's Helm values table names only values
// the chart has, and every value of values.yaml is in it (a row's key
// covers the values under it). A row's keys are written `a.b.c`, then
// `.d` (a sibling: a.b.d) or `e` (a.b.e), and `a.b.*` for all under a.b.
func TestREADMEValuesTable(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(env.Root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := testenv.MarkdownTable(string(raw), "| value | default | what |")
	if len(rows) == 0 {
		t.Fatal(`README has no "| value | default | what |" table`)
	}
	values := readValues(t, filepath.Join(chartDir(), "values.yaml"))
	var leaves []string
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		if m, ok := v.(map[string]any); ok && len(m) > 0 {
			for k, sub := range m {
				walk(strings.TrimPrefix(prefix+"."+k, "."), sub)
			}
			return
		}
		leaves = append(leaves, prefix)
	}
	walk("", values)
	exists := func(key string) bool {
		var v any = values
		for _, part := range strings.Split(key, ".") {
			m, ok := v.(map[string]any)
			if !ok {
				return false
			}
			if v, ok = m[part]; !ok {
				return false
			}
		}
		return true
	}
	var documented []string
	for _, r := range rows {
		parent := ""
		for _, k := range testenv.CodeSpans(r[0]) {
			switch {
			case strings.HasPrefix(k, "."):
				k = parent + k
			case !strings.Contains(k, ".") && parent != "":
				k = parent + "." + k
			}
			k = strings.TrimSuffix(k, ".*")
			if i := strings.LastIndex(k, "."); i >= 0 {
				parent = k[:i]
			}
			if !exists(k) {
				t.Errorf("README documents value %s, which values.yaml does not have", k)
			}
			documented = append(documented, k)
		}
	}
	for _, l := range leaves {
		if !slices.ContainsFunc(documented, func(d string) bool { return l == d || strings.HasPrefix(l, d+".") }) {
			t.Errorf("value %s (values.yaml) is not in README's values table", l)
		}
	}
}
