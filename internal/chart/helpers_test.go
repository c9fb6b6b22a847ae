package chart_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	chartv2 "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/chartinstall"
	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
)

var (
	env    *testenv.Env
	update = flag.Bool("update", false, "rewrite the golden renders in testdata/")
)

// The chart installs the Trellis CRDs itself; the Gateway API, cert-manager
// and Prometheus Operator CRDs the chart's options use are preinstalled.
func TestMain(m *testing.M) {
	root, err := testenv.RepoRoot()
	if err != nil {
		panic(err)
	}
	testenv.Main(m, &env, testenv.Options{
		WithoutTrellisCRDs: true,
		CRDDirectories:     []string{filepath.Join(root, "config", "crd", "prometheus-operator")},
	})
}

const wait = 90 * time.Second

func chartDir() string { return filepath.Join(env.Root, "charts", "trellis") }

func allOnValuesFile() string { return filepath.Join(chartDir(), "ci", "all-on-values.yaml") }

func loadChart(t testing.TB) *chartv2.Chart {
	t.Helper()
	ch, err := loader.Load(chartDir())
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	return ch
}

func readValues(t testing.TB, file string) map[string]any {
	t.Helper()
	if file == "" {
		return map[string]any{}
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return v
}

// kubeconfig writes a kubeconfig for the test apiserver with the given
// credentials (the envtest admin's client certificate when token is empty).
func kubeconfig(t testing.TB, token string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := chartinstall.TokenKubeconfig(env.Config, token, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// helmConfig is an SDK action configuration against the test apiserver,
// keeping releases in Secrets like the helm CLI.
func helmConfig(t testing.TB, namespace string) *action.Configuration {
	t.Helper()
	cfg, err := chartinstall.Configuration(kubeconfig(t, ""), namespace)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

const goldenNamespace = "trellis-system"

// render is `helm template trellis charts/trellis -n <namespace>`: a
// client-side dry run that never talks to the apiserver.
func render(t testing.TB, vals map[string]any, namespace string) (*releasev1.Release, error) {
	t.Helper()
	cfg := action.NewConfiguration(action.ConfigurationSetLogger(slog.NewTextHandler(io.Discard, nil)))
	inst := action.NewInstall(cfg)
	inst.DryRunStrategy = action.DryRunClient
	inst.Replace = true
	inst.ReleaseName, inst.Namespace = "trellis", namespace
	kv, err := common.ParseKubeVersion("v1.37.2")
	if err != nil {
		t.Fatal(err)
	}
	inst.KubeVersion = kv
	rel, err := inst.Run(loadChart(t), vals)
	if err != nil {
		return nil, err
	}
	return rel.(*releasev1.Release), nil
}

// objects splits a multi-document manifest into objects.
func objects(t testing.TB, manifest string) []*unstructured.Unstructured {
	t.Helper()
	out, err := localcluster.DecodeManifests(strings.NewReader(manifest))
	if err != nil {
		t.Fatalf("decode rendered manifest: %v", err)
	}
	return out
}

// find returns the rendered object of that kind and name, failing the test
// when there is none.
func find(t testing.TB, objs []*unstructured.Unstructured, kind, name string, into any) {
	t.Helper()
	for _, u := range objs {
		if u.GetKind() == kind && u.GetName() == name {
			if err := runtimeConvert(u, into); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no %s %s rendered", kind, name)
}

func runtimeConvert(u *unstructured.Unstructured, into any) error {
	b, err := u.MarshalJSON()
	if err != nil {
		return err
	}
	return yaml.Unmarshal(b, into)
}

func namespace(t testing.TB, name string, labels map[string]string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), ns) })
}

// eventually polls cond until it holds or the wait ends.
func eventually(t testing.TB, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(wait)
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (last error: %v)", what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// gone waits until obj is deleted; on timeout the failure shows the object
// as last seen (finalizers, status conditions).
func gone(t testing.TB, obj client.Object) {
	t.Helper()
	eventually(t, "deletion of "+obj.GetName(), func() (bool, error) {
		err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(obj), obj)
		if err == nil {
			b, _ := yaml.Marshal(obj)
			err = fmt.Errorf("still there:\n%s", b)
		}
		return apierrors.IsNotFound(err), err
	})
}

func golden(t testing.TB, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./internal/chart -run %s -update to create it)", err, t.Name())
	}
	if !bytes.Equal(want, got) {
		t.Errorf("render differs from %s (run with -update after checking the change):\n%s", path, lineDiff(string(want), string(got)))
	}
}

// lineDiff names the first differing line.
func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < max(len(al), len(bl)); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return "line " + strconv.Itoa(i+1) + ":\n  golden: " + x + "\n  render: " + y
		}
	}
	return ""
}
