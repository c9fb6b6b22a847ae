// Package chartinstall installs the Trellis Helm chart with Helm's Go SDK,
// as `helm install` would, and runs the controller the way the chart's
// Deployment would run it — with the chart's arguments and its
// ServiceAccount's token — as a local process. The e2e framework and the
// demo use it, so every scenario runs under the chart's RBAC.
package chartinstall

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/kube"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// ServiceAccount and Deployment are the controller's names in the chart.
const (
	ServiceAccount = "trellis-controller"
	Deployment     = "trellis-controller"
)

// Configuration is a Helm SDK action configuration for the cluster of
// kubeconfig, keeping releases in Secrets like the helm CLI.
func Configuration(kubeconfig, namespace string) (*action.Configuration, error) {
	flags := genericclioptions.NewConfigFlags(false)
	flags.KubeConfig, flags.Namespace = &kubeconfig, &namespace
	cfg := action.NewConfiguration(action.ConfigurationSetLogger(slog.NewTextHandler(io.Discard, nil)))
	if err := cfg.Init(flags, namespace, "secret"); err != nil {
		return nil, err
	}
	return cfg, nil
}

// Install installs the chart in chartDir as release into namespace
// (creating it), like `helm install --create-namespace`, without waiting
// for pods to become ready.
func Install(ctx context.Context, kubeconfig, namespace, release, chartDir string, values map[string]any) (*releasev1.Release, error) {
	cfg, err := Configuration(kubeconfig, namespace)
	if err != nil {
		return nil, err
	}
	ch, err := loader.Load(chartDir)
	if err != nil {
		return nil, fmt.Errorf("load chart: %w", err)
	}
	// The helm CLI's field manager, so that `helm upgrade` with the CLI
	// owns what this install applied (with another manager, server-side
	// apply reports conflicts on every field the chart sets).
	kube.ManagedFieldsManager = "helm"
	inst := action.NewInstall(cfg)
	inst.Namespace, inst.ReleaseName, inst.CreateNamespace = namespace, release, true
	inst.WaitStrategy, inst.Timeout = kube.HookOnlyStrategy, 2*time.Minute
	rel, err := inst.RunWithContext(ctx, ch, values)
	if err != nil {
		return nil, fmt.Errorf("helm install: %w", err)
	}
	return rel.(*releasev1.Release), nil
}

// TokenKubeconfig is a kubeconfig for the apiserver of cfg that
// authenticates with token, or with cfg's client certificate when token is
// empty.
func TokenKubeconfig(cfg *rest.Config, token, path string) error {
	user := &clientcmdapi.AuthInfo{Token: token}
	if token == "" {
		user.ClientCertificateData, user.ClientKeyData = cfg.CertData, cfg.KeyData
	}
	kc := clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{"local": {Server: cfg.Host, CertificateAuthorityData: cfg.CAData}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{"local": user},
		Contexts:       map[string]*clientcmdapi.Context{"local": {Cluster: "local", AuthInfo: "local"}},
		CurrentContext: "local",
	}
	return clientcmd.WriteToFile(kc, path)
}

// ServiceAccountToken requests a token of namespace/sa from the apiserver
// (TokenRequest), valid for ttl.
func ServiceAccountToken(ctx context.Context, cfg *rest.Config, namespace, sa string, ttl time.Duration) (string, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", err
	}
	secs := int64(ttl.Seconds())
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, sa, &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &secs}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("TokenRequest for %s/%s: %w", namespace, sa, err)
	}
	return tr.Status.Token, nil
}

// ControllerArgs are the arguments of the chart's controller container in
// the installed Deployment, with the flags in overrides replaced (or added,
// in sorted order, when the chart does not pass them).
func ControllerArgs(ctx context.Context, cfg *rest.Config, namespace string, overrides map[string]string) ([]string, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	d, err := cs.AppsV1().Deployments(namespace).Get(ctx, Deployment, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return Override(containerArgs(d), overrides), nil
}

func containerArgs(d *appsv1.Deployment) []string {
	for _, c := range d.Spec.Template.Spec.Containers {
		if c.Name == "controller" {
			return c.Args
		}
	}
	return nil
}

// Override replaces --flag=value arguments named in overrides and appends
// the others.
func Override(args []string, overrides map[string]string) []string {
	done := map[string]bool{}
	var out []string
	for _, a := range args {
		name, _, _ := strings.Cut(a, "=")
		if v, ok := overrides[name]; ok {
			a, done[name] = name+"="+v, true
		}
		out = append(out, a)
	}
	var rest []string
	for name, v := range overrides {
		if !done[name] {
			rest = append(rest, name+"="+v)
		}
	}
	slices.Sort(rest)
	return append(out, rest...)
}
