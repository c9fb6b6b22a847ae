package e2e_test

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	clientset "k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/gateway-api/conformance"
	confv1 "sigs.k8s.io/gateway-api/conformance/apis/v1"
	"sigs.k8s.io/gateway-api/conformance/utils/config"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
	"sigs.k8s.io/yaml"
)

// conformanceReport is the committed report of the official Gateway API
// conformance suite's mesh profiles (make conformance regenerates it).
const conformanceReport = "conformance/reports/v1.6.3/trellis/default-report.yaml"

// TestGatewayAPIMeshConformance runs the official, unmodified Gateway API
// conformance suite (sigs.k8s.io/gateway-api/conformance at the go.mod pin)
// for the mesh profiles MESH-HTTP and MESH-GRPC against Trellis: the suite
// applies its own manifests (echo-advanced Deployments in namespaces the
// injector labels, its routes), and every request is made by the suite's
// echo client exec'd (pods/exec, through the apiserver) in a pod whose
// stock Envoy sidecar carries it. Every mesh feature of the pinned suite is
// declared supported, so no mesh test is skipped. The report must match
// the committed one (dates aside); TRELLIS_UPDATE_CONFORMANCE=1 (make
// conformance) rewrites it.
func TestGatewayAPIMeshConformance(t *testing.T) {
	requireEnv(t)
	cfg := env.Cluster.Env.Config
	scheme := env.Cluster.Client().Scheme()
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	cs, err := clientset.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := gwv1.Install(scheme); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "report.yaml")
	supported := []features.FeatureName{features.SupportMesh, features.SupportHTTPRoute, features.SupportGRPCRoute,
		// The HTTPRoute features the mesh tests use.
		features.SupportHTTPRouteResponseHeaderModification, features.SupportHTTPRouteParentRefPort,
		features.SupportHTTPRoute303RedirectStatusCode, features.SupportHTTPRoute307RedirectStatusCode, features.SupportHTTPRoute308RedirectStatusCode,
	}
	for _, f := range features.MeshExtendedFeatures.UnsortedList() {
		supported = append(supported, f.Name)
	}
	opts := suite.ConformanceOptions{
		ConfigurableOptions: suite.ConfigurableOptions{
			CleanupBaseResources: true,
			CleanupTestResources: true,
			NamespaceLabels:      map[string]string{"trellis.dev/inject": "enabled"},
			Mode:                 "default",
			TimeoutConfig:        config.DefaultTimeoutConfig(),
			ConformanceProfiles: []suite.ConformanceProfileName{
				suite.MeshHTTPConformanceProfileName, suite.MeshGRPCConformanceProfileName,
			},
			SupportedFeatures: supported,
			Implementation: confv1.Implementation{
				Organization: "trellis-mesh", Project: "trellis", URL: "https://github.com/trellis-mesh/trellis",
				Version: chartAppVersion(t), Contact: []string{"https://github.com/trellis-mesh/trellis/issues"},
			},
			ReportOutputPath: out,
		},
		Client: c, Clientset: cs, RestConfig: cfg,
		ManifestFS: []fs.FS{&conformance.Manifests},
	}
	t.Run("suite", func(t *testing.T) { conformance.RunConformanceWithOptions(t, opts) })
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := normalReport(raw, true)
	if err != nil {
		t.Fatalf("the suite's report: %v\n%s", err, raw)
	}
	path := filepath.Join(env.Root, conformanceReport)
	if os.Getenv("TRELLIS_UPDATE_CONFORMANCE") == "1" {
		if t.Failed() {
			t.Fatalf("the suite failed: %s not rewritten; the report of this run:\n%s", conformanceReport, got)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", conformanceReport)
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (make conformance writes it)", err)
	}
	if want, err = normalReport(want, false); err != nil {
		t.Fatalf("%s: %v", conformanceReport, err)
	}
	if !bytes.Equal(undated(got), undated(want)) {
		t.Errorf("the conformance report differs from %s (run make conformance and commit it):\n%s", conformanceReport, got)
	}
}

var reportDate = regexp.MustCompile(`(?m)^date: .*$`)

func undated(report []byte) []byte { return reportDate.ReplaceAll(report, []byte("date: -")) }

// normalReport re-encodes a conformance report with its profiles sorted by
// name: the suite lists them in map order, which differs from run to run
// (CI once failed on MESH-HTTP printed before MESH-GRPC). strict rejects
// fields the report type does not know (the suite's own output must parse
// completely; an older committed report may be looser).
func normalReport(b []byte, strict bool) ([]byte, error) {
	var r confv1.ConformanceReport
	var opts []yaml.JSONOpt
	if strict {
		opts = append(opts, yaml.DisallowUnknownFields)
	}
	if err := yaml.Unmarshal(b, &r, opts...); err != nil {
		return nil, err
	}
	sort.Slice(r.ProfileReports, func(i, j int) bool { return r.ProfileReports[i].Name < r.ProfileReports[j].Name })
	return yaml.Marshal(r)
}

func chartAppVersion(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(env.Root, "charts", "trellis", "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &chart); err != nil || chart.AppVersion == "" {
		t.Fatalf("Chart.yaml appVersion: %v", err)
	}
	return "v" + strings.TrimPrefix(chart.AppVersion, "v")
}

// TestConformanceReportOrderDoesNotMatter: the committed report and the same
// report with its profiles in the other order compare equal, and a changed
// statistic does not.
func TestConformanceReportOrderDoesNotMatter(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", conformanceReport))
	if err != nil {
		t.Fatal(err)
	}
	var r confv1.ConformanceReport
	if err := yaml.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if len(r.ProfileReports) < 2 {
		t.Fatalf("the committed report has %d profiles; want the mesh profiles", len(r.ProfileReports))
	}
	slices.Reverse(r.ProfileReports)
	reversed, err := yaml.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	a, err := normalReport(b, false)
	if err != nil {
		t.Fatal(err)
	}
	c, err := normalReport(reversed, true)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, c) {
		t.Errorf("profile order changed the normal form:\n%s\nvs\n%s", a, c)
	}
	r.ProfileReports[0].Core.Statistics.Passed++
	changed, _ := yaml.Marshal(r)
	if d, _ := normalReport(changed, true); bytes.Equal(a, d) {
		t.Error("a changed Passed count compared equal")
	}
}
