package chart_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/trellis-mesh/trellis/internal/localcluster"
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
	_, section, ok := strings.Cut(string(raw), "### Why each permission")
	if !ok {
		t.Fatal("README has no \"Why each permission\" section")
	}
	out := map[permission]bool{}
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "#") {
			break
		}
		cells := strings.Split(strings.Trim(line, "| "), " | ")
		if len(cells) != 5 || (cells[0] != "cluster" && cells[0] != "namespace") {
			continue
		}
		if strings.TrimSpace(cells[4]) == "" {
			t.Errorf("README permission row without a reason: %s", line)
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
