package main

import (
	"cmp"
	"context"
	"fmt"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/pkg/analyze"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/controller"
)

// liveFlags are the kubeconfig flags of analyze --live and describe
// request --live; those commands keep their own -n.
type liveFlags struct {
	live bool
	kube *genericclioptions.ConfigFlags
}

func newLiveFlags() *liveFlags {
	k := genericclioptions.NewConfigFlags(true)
	k.Namespace = nil // the command's own -n
	return &liveFlags{kube: k}
}

func (l *liveFlags) add(fs *pflag.FlagSet, what string) {
	fs.BoolVar(&l.live, "live", false, what)
	l.kube.AddFlags(fs)
}

// liveCluster reads what the controller reads from the cluster of the
// kubeconfig (controller.ListInput: the same lists, the same Gateway API
// kinds it would find) and builds the mesh from it as the controller does.
func (l *liveFlags) cluster(ctx context.Context) (*analyze.Cluster, error) {
	cfg, err := l.kube.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, meshv1alpha1.AddToScheme, gwv1.Install} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("connect to the cluster: %w", err)
	}
	served, _, err := controller.GatewayAPIKinds(c.RESTMapper())
	if err != nil {
		return nil, err
	}
	in, err := controller.ListInput(ctx, c, func(k string) bool { return served[k] }, nil)
	if err != nil {
		return nil, fmt.Errorf("read the mesh's objects (--live needs to list what the controller lists, cluster-wide): %w", err)
	}
	var nss corev1.NamespaceList
	if err := c.List(ctx, &nss); err != nil {
		return nil, err
	}
	namespaces := make([]*corev1.Namespace, len(nss.Items))
	for i := range nss.Items {
		namespaces[i] = &nss.Items[i]
	}
	return analyze.Live(in, namespaces), nil
}

// source is where describe reads the mesh from: manifests (-f) or the
// cluster (--live).
type source struct {
	files     []string
	namespace string
	assume    bool
	live      *liveFlags
}

func newSource() *source { return &source{live: newLiveFlags()} }

func (s *source) add(fs *pflag.FlagSet, namespaceUsage string) {
	fs.StringArrayVarP(&s.files, "filename", "f", nil, "manifests: a file, a directory (read recursively) or - for standard input; repeatable")
	fs.StringVarP(&s.namespace, "namespace", "n", "default", namespaceUsage)
	fs.BoolVar(&s.assume, "assume-injection", true, "treat namespaces the manifests do not define as labelled trellis.dev/inject=enabled")
	s.live.add(fs, "read the cluster of the kubeconfig instead of manifests")
}

// cluster builds the mesh from the source; manifests that do not decode
// are warned about on stderr and left out.
func (s *source) cluster(cmd *cobra.Command) (*analyze.Cluster, error) {
	switch {
	case s.live.live && len(s.files) > 0:
		return nil, usageError(cmd, "-f and --live exclude each other: read manifests or the cluster")
	case s.live.live:
		return s.live.cluster(cmd.Context())
	case len(s.files) == 0:
		return nil, usageError(cmd, "-f is required: name the manifests (a file, a directory, or - for standard input), or --live for the cluster")
	}
	objs, loadFindings, err := analyze.Load(s.files, s.namespace, cmd.InOrStdin())
	if err != nil {
		return nil, err
	}
	for _, f := range loadFindings {
		fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s: %s (left out)\n", cmp.Or(f.Source, f.Object.String()), f.Message)
	}
	return analyze.Build(objs, analyze.Options{AssumeInjection: s.assume}), nil
}
