package main

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/discovery"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/inject"
)

// checkResult is one line of trellisctl check.
type checkResult struct {
	ok, warn bool
	what     string
	// fix says what to do when not ok.
	fix string
}

func newCheck() *cobra.Command {
	flags := genericclioptions.NewConfigFlags(true)
	var pre bool
	var cpNamespace string
	var timeout time.Duration
	debug := &debugFlags{kube: flags}
	var output string
	cmd := &cobra.Command{
		Use:   "check [--pre]",
		Short: "Check that the cluster can run Trellis (--pre), or that the installed mesh is healthy",
		Long: `check runs a list of checks against the cluster of the current kubeconfig context and prints a
line for each: ✔ passed, ! a warning, ✘ failed with what to do. The exit status is 1 when any check
failed, so it can gate a pipeline.

--pre, before installing: Kubernetes version and native sidecars, the admission API, the Gateway
API CRDs (which channel), cert-manager, and whether you may create what the chart creates.

Without --pre, after installing: the Trellis CRDs and their stored versions, the controller's
ready replicas and leader, both webhooks' CA bundles, the mesh root certificate's age and expiry,
the trust bundle in every meshed namespace, pods in meshed namespaces that have no sidecar, and
Trellis objects whose status reports a problem, and from the controller's debug API (as
proxy-status reads it): injected pods with no connected proxy, proxies that rejected their
configuration, and proxies whose certificate expires within 5 minutes (renewal failing).`,
		Example: `  trellisctl check --pre
  trellisctl check --context prod -n trellis-system`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !slices.Contains([]string{"table", "yaml", "json"}, output) {
				return usageError(cmd, "--output must be table, yaml or json")
			}
			cfg, err := flags.ToRESTConfig()
			if err != nil {
				return fmt.Errorf("kubeconfig: %w", err)
			}
			cfg.Timeout = timeout
			scheme := runtime.NewScheme()
			for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, apiextensionsv1.AddToScheme, meshv1alpha1.AddToScheme} {
				if err := add(scheme); err != nil {
					return err
				}
			}
			c, err := client.New(cfg, client.Options{Scheme: scheme})
			if err != nil {
				return fmt.Errorf("connect to the cluster: %w", err)
			}
			dc, err := discovery.NewDiscoveryClientForConfig(cfg)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			var results []checkResult
			if pre {
				results = preChecks(ctx, c, dc)
			} else {
				results = postChecks(ctx, c, cpNamespace, time.Now())
				debug.controllerNamespace, debug.timeout = cpNamespace, timeout
				results = append(results, proxyChecks(ctx, debug, cmd.ErrOrStderr(), time.Now())...)
			}
			failed := slices.ContainsFunc(results, func(r checkResult) bool { return !r.ok && !r.warn })
			if output == "table" {
				printChecks(cmd.OutOrStdout(), results)
			} else if err := printStructured(cmd.OutOrStdout(), structuredChecks(results), output); err != nil {
				return err
			}
			if failed {
				return exitError{1}
			}
			return nil
		},
	}
	flags.AddFlags(cmd.Flags())
	// The control plane's namespace, not kubectl's -n (which means nothing here).
	cmd.Flags().Lookup("namespace").Usage = "namespace Trellis is installed in"
	cmd.Flags().BoolVar(&pre, "pre", false, "check whether the cluster can run Trellis, before installing")
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "give up on the cluster after this long")
	debug.addController(cmd.Flags())
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table, yaml or json")
	cmd.PreRun = func(*cobra.Command, []string) {
		cpNamespace = "trellis-system"
		if flags.Namespace != nil && *flags.Namespace != "" {
			cpNamespace = *flags.Namespace
		}
	}
	return cmd
}

// structuredCheck is one check as -o json|yaml prints it.
type structuredCheck struct {
	Status string `json:"status"` // ok, warning or failed
	Check  string `json:"check"`
	Fix    string `json:"fix,omitempty"`
}

func structuredChecks(rs []checkResult) map[string][]structuredCheck {
	out := []structuredCheck{}
	for _, r := range rs {
		c := structuredCheck{Status: "failed", Check: r.what, Fix: r.fix}
		switch {
		case r.ok:
			c.Status, c.Fix = "ok", ""
		case r.warn:
			c.Status = "warning"
		}
		out = append(out, c)
	}
	return map[string][]structuredCheck{"checks": out}
}

// printChecks prints the lines and reports whether any check failed.
func printChecks(w io.Writer, rs []checkResult) (failed bool) {
	n, warns := 0, 0
	for _, r := range rs {
		switch {
		case r.ok:
			fmt.Fprintf(w, "✔ %s\n", r.what)
		case r.warn:
			warns++
			fmt.Fprintf(w, "! %s\n    → %s\n", r.what, r.fix)
		default:
			fmt.Fprintf(w, "✘ %s\n    → %s\n", r.what, r.fix)
			failed = true
			n++
		}
	}
	switch {
	case failed:
		fmt.Fprintf(w, "%d of %d checks failed\n", n, len(rs))
	case warns > 0:
		fmt.Fprintf(w, "all %d checks passed, %d with a warning\n", len(rs), warns)
	default:
		fmt.Fprintf(w, "all %d checks passed\n", len(rs))
	}
	return failed
}

func preChecks(ctx context.Context, c client.Client, dc discovery.DiscoveryInterface) []checkResult {
	var out []checkResult
	v, err := dc.ServerVersion()
	if err != nil {
		return []checkResult{{what: "reach the Kubernetes API", fix: err.Error()}}
	}
	minor, _ := strconv.Atoi(strings.TrimRight(v.Minor, "+"))
	major, _ := strconv.Atoi(v.Major)
	switch {
	case major > 1 || minor >= 29:
		out = append(out, checkResult{ok: true, what: fmt.Sprintf("Kubernetes %s.%s (≥ 1.29): native sidecars (the proxy starts before and stops after the app)", v.Major, v.Minor)})
	default:
		out = append(out, checkResult{warn: true, what: fmt.Sprintf("Kubernetes %s.%s is older than 1.29: no native sidecars", v.Major, v.Minor),
			fix: "upgrade, or annotate pods trellis.dev/native-sidecar: \"false\" (the proxy then runs as a regular container with a postStart wait)"})
	}
	if _, err := dc.ServerResourcesForGroupVersion("admissionregistration.k8s.io/v1"); err != nil {
		out = append(out, checkResult{what: "admission webhooks (admissionregistration.k8s.io/v1)", fix: "enable the MutatingAdmissionWebhook and ValidatingAdmissionWebhook admission plugins: injection needs them"})
	} else {
		out = append(out, checkResult{ok: true, what: "admission webhooks (admissionregistration.k8s.io/v1) served"})
	}
	for _, kind := range []string{"httproutes", "grpcroutes"} {
		var crd apiextensionsv1.CustomResourceDefinition
		err := c.Get(ctx, client.ObjectKey{Name: kind + ".gateway.networking.k8s.io"}, &crd)
		switch {
		case apierrors.IsNotFound(err):
			out = append(out, checkResult{warn: true, what: "Gateway API CRD " + kind + " not installed",
				fix: "install the Gateway API standard channel (v1.6) for HTTPRoute/GRPCRoute on Services (GAMMA); without it Trellis runs on Services and its own policies"})
		case err != nil:
			out = append(out, checkResult{what: "read the Gateway API CRD " + kind, fix: err.Error()})
		default:
			ch := crd.Annotations["gateway.networking.k8s.io/channel"]
			out = append(out, checkResult{ok: true, what: fmt.Sprintf("Gateway API CRD %s installed (%s channel, %s)", kind, cmp.Or(ch, "unknown"), crd.Annotations["gateway.networking.k8s.io/bundle-version"])})
		}
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := c.Get(ctx, client.ObjectKey{Name: "certificaterequests.cert-manager.io"}, &crd); err == nil {
		out = append(out, checkResult{ok: true, what: "cert-manager installed (optional: certManager.enabled uses it for certificates)"})
	} else {
		out = append(out, checkResult{ok: true, what: "cert-manager not installed (optional: the built-in CA issues every certificate)"})
	}
	for _, p := range []struct{ group, resource string }{
		{"apiextensions.k8s.io", "customresourcedefinitions"},
		{"rbac.authorization.k8s.io", "clusterroles"},
		{"rbac.authorization.k8s.io", "clusterrolebindings"},
		{"admissionregistration.k8s.io", "mutatingwebhookconfigurations"},
		{"admissionregistration.k8s.io", "validatingwebhookconfigurations"},
		{"", "namespaces"},
	} {
		ssar := &authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: "create", Group: p.group, Resource: p.resource},
		}}
		name := p.resource
		if p.group != "" {
			name += "." + p.group
		}
		if err := c.Create(ctx, ssar); err != nil {
			out = append(out, checkResult{what: "ask whether you may create " + name, fix: err.Error()})
		} else if !ssar.Status.Allowed {
			out = append(out, checkResult{what: "you may not create " + name, fix: "the chart creates them: install as a cluster administrator (or have one install it)"})
		} else {
			out = append(out, checkResult{ok: true, what: "you may create " + name})
		}
	}
	return out
}

func postChecks(ctx context.Context, c client.Client, ns string, now time.Time) []checkResult {
	var out []checkResult
	add := func(r checkResult) { out = append(out, r) }

	for _, k := range []string{"meshconfigs", "accesspolicies", "backendpolicies", "externalservices"} {
		var crd apiextensionsv1.CustomResourceDefinition
		name := k + "." + meshv1alpha1.GroupVersion.Group
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &crd); err != nil {
			add(checkResult{what: "CRD " + name, fix: fmt.Sprintf("%v: install the chart (it ships the CRDs), or kubectl apply -f charts/trellis/crds/", err)})
			continue
		}
		if sv := crd.Status.StoredVersions; len(sv) != 1 || sv[0] != meshv1alpha1.GroupVersion.Version {
			add(checkResult{warn: true, what: fmt.Sprintf("CRD %s stores versions %v", name, sv), fix: "objects in other versions must be migrated before those versions are removed"})
			continue
		}
		add(checkResult{ok: true, what: "CRD " + name + " (stored: " + meshv1alpha1.GroupVersion.Version + ")"})
	}

	var dep appsv1.Deployment
	switch err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "trellis-controller"}, &dep); {
	case err != nil:
		add(checkResult{what: "controller Deployment " + ns + "/trellis-controller", fix: fmt.Sprintf("%v: is Trellis installed in %s? (-n names its namespace)", err, ns)})
	case dep.Status.ReadyReplicas == 0:
		add(checkResult{what: fmt.Sprintf("controller: 0 of %d replicas ready", ptr.Deref(dep.Spec.Replicas, 1)), fix: "kubectl -n " + ns + " describe pods -l app.kubernetes.io/name=trellis; injection fails closed while no replica answers"})
	case dep.Status.ReadyReplicas < ptr.Deref(dep.Spec.Replicas, 1):
		add(checkResult{warn: true, what: fmt.Sprintf("controller: %d of %d replicas ready", dep.Status.ReadyReplicas, ptr.Deref(dep.Spec.Replicas, 1)), fix: "kubectl -n " + ns + " get pods -l app.kubernetes.io/name=trellis"})
	default:
		add(checkResult{ok: true, what: fmt.Sprintf("controller: %d of %d replicas ready", dep.Status.ReadyReplicas, ptr.Deref(dep.Spec.Replicas, 1))})
	}

	var lease coordinationv1.Lease
	if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "trellis-controller.mesh.trellis.dev"}, &lease); err != nil {
		add(checkResult{warn: true, what: "no leader election Lease", fix: "status conditions are written by the leader only; check the controller's log"})
	} else if lease.Spec.RenewTime == nil || lease.Spec.LeaseDurationSeconds == nil ||
		now.Sub(lease.Spec.RenewTime.Time) > time.Duration(*lease.Spec.LeaseDurationSeconds)*time.Second {
		add(checkResult{what: "the leader Lease is not being renewed", fix: "no replica leads: status is not updated; check the controller's log"})
	} else {
		add(checkResult{ok: true, what: "leader: " + ptr.Deref(lease.Spec.HolderIdentity, "?")})
	}

	var root *x509.Certificate
	var cm corev1.ConfigMap
	if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: controller.RootCAConfigMap}, &cm); err != nil {
		add(checkResult{what: "mesh root certificate (ConfigMap " + ns + "/" + controller.RootCAConfigMap + ")", fix: fmt.Sprintf("%v: the controller publishes it on start; check its log", err)})
	} else if certs := parseCerts(cm.Data[controller.RootCAKey]); len(certs) == 0 {
		add(checkResult{what: "mesh root certificate", fix: "ConfigMap " + controller.RootCAConfigMap + " holds no certificate; the controller rewrites it: check its log"})
	} else {
		root = certs[0]
		left := root.NotAfter.Sub(now)
		age := now.Sub(root.NotBefore)
		switch {
		case left <= 0:
			add(checkResult{what: "mesh root certificate expired " + root.NotAfter.Format(time.RFC3339), fix: "rotate the root: create Secret trellis-ca-next (README \"Identity and certificates\")"})
		case left < 90*24*time.Hour:
			add(checkResult{warn: true, what: fmt.Sprintf("mesh root certificate expires in %d days (%s)", int(left.Hours()/24), root.NotAfter.Format("2006-01-02")), fix: "rotate the root well before: create Secret trellis-ca-next"})
		default:
			add(checkResult{ok: true, what: fmt.Sprintf("mesh root certificate %q: %d days old, expires in %d days", root.Subject.CommonName, int(age.Hours()/24), int(left.Hours()/24))})
		}
	}

	for _, wh := range []struct {
		name string
		obj  client.Object
	}{
		{"trellis-injection", &admissionregistrationv1.MutatingWebhookConfiguration{}},
		{"trellis-validation", &admissionregistrationv1.ValidatingWebhookConfiguration{}},
	} {
		if err := c.Get(ctx, client.ObjectKey{Name: wh.name}, wh.obj); err != nil {
			add(checkResult{what: "webhook configuration " + wh.name, fix: fmt.Sprintf("%v: reinstall the chart", err)})
			continue
		}
		var bundles [][]byte
		switch o := wh.obj.(type) {
		case *admissionregistrationv1.MutatingWebhookConfiguration:
			for _, w := range o.Webhooks {
				bundles = append(bundles, w.ClientConfig.CABundle)
			}
		case *admissionregistrationv1.ValidatingWebhookConfiguration:
			for _, w := range o.Webhooks {
				bundles = append(bundles, w.ClientConfig.CABundle)
			}
		}
		add(checkBundle(wh.name, bundles, now))
	}

	var nss corev1.NamespaceList
	if err := c.List(ctx, &nss, client.MatchingLabels{inject.LabelInject: "enabled"}); err != nil {
		add(checkResult{what: "list meshed namespaces", fix: err.Error()})
		return out
	}
	var missing, uninjected []string
	for _, n := range nss.Items {
		var b corev1.ConfigMap
		if err := c.Get(ctx, client.ObjectKey{Namespace: n.Name, Name: controller.RootCAConfigMap}, &b); err != nil || len(parseCerts(b.Data[controller.RootCAKey])) == 0 {
			missing = append(missing, n.Name)
		}
		var pods corev1.PodList
		if err := c.List(ctx, &pods, client.InNamespace(n.Name)); err == nil {
			for _, p := range pods.Items {
				if p.Spec.HostNetwork || p.Labels[inject.LabelInject] == "disabled" || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
					continue
				}
				if p.Annotations[inject.AnnotationStatus] != "injected" {
					uninjected = append(uninjected, n.Name+"/"+p.Name)
				}
			}
		}
	}
	add(webhookAnswers(ctx, c, nss.Items))
	if len(missing) > 0 {
		add(checkResult{what: "trust bundle ConfigMap " + controller.RootCAConfigMap + " missing in " + strings.Join(missing, ", "), fix: "sidecars there cannot verify the control plane; the controller recreates it: check its log"})
	} else {
		add(checkResult{ok: true, what: fmt.Sprintf("trust bundle present in all %d meshed namespaces", len(nss.Items))})
	}
	if len(uninjected) > 0 {
		add(checkResult{warn: true, what: fmt.Sprintf("%d %s in meshed namespaces %s no sidecar: %s", len(uninjected), plural(len(uninjected), "pod"), map[bool]string{true: "has", false: "have"}[len(uninjected) == 1], limit(uninjected, 5)),
			fix: "they started before the namespace was labelled or while the webhook was down: kubectl rollout restart their workloads"})
	} else {
		add(checkResult{ok: true, what: "every pod in meshed namespaces has its sidecar"})
	}

	var bad []string
	for _, kind := range []string{"MeshConfig", "AccessPolicy", "BackendPolicy", "ExternalService"} {
		l := &unstructured.UnstructuredList{}
		l.SetGroupVersionKind(meshv1alpha1.GroupVersion.WithKind(kind + "List"))
		if err := c.List(ctx, l); err != nil {
			continue
		}
		for _, o := range l.Items {
			conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
			for _, x := range conds {
				cond, _ := x.(map[string]any)
				if (cond["type"] == meshv1alpha1.ConditionAccepted || cond["type"] == meshv1alpha1.ConditionResolvedRefs) && cond["status"] == "False" {
					bad = append(bad, fmt.Sprintf("%s %s: %v", kind, strings.TrimPrefix(o.GetNamespace()+"/"+o.GetName(), "/"), cond["message"]))
					break
				}
			}
		}
	}
	if len(bad) > 0 {
		add(checkResult{warn: true, what: fmt.Sprintf("%d Trellis %s a problem: %s", len(bad), map[bool]string{true: "object reports", false: "objects report"}[len(bad) == 1], limit(bad, 5)), fix: "kubectl describe the object; trellisctl analyze -f on its manifests says the same offline"})
	} else {
		add(checkResult{ok: true, what: "no Trellis object reports a problem"})
	}
	return out
}

// checkBundle checks a webhook configuration's CA bundles: present,
// parseable and not expired.
func checkBundle(name string, bundles [][]byte, now time.Time) checkResult {
	if len(bundles) == 0 {
		return checkResult{what: "webhook configuration " + name + " has no webhooks", fix: "reinstall the chart"}
	}
	for _, b := range bundles {
		certs := parseCerts(string(b))
		if len(certs) == 0 {
			return checkResult{what: "webhook " + name + ": empty or unreadable caBundle", fix: "the apiserver cannot call the webhook; the controller fills it in on start (or cert-manager's CA injector does): check their logs"}
		}
		for _, c := range certs {
			if now.After(c.NotAfter) {
				return checkResult{what: "webhook " + name + ": caBundle certificate expired " + c.NotAfter.Format(time.RFC3339), fix: "restart the controller (it rewrites the bundle) or check cert-manager"}
			}
		}
	}
	return checkResult{ok: true, what: "webhook " + name + ": caBundle set and valid"}
}

func parseCerts(pemData string) []*x509.Certificate {
	var out []*x509.Certificate
	rest := []byte(pemData)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil && b.Type == "CERTIFICATE" {
			out = append(out, c)
		}
	}
}

func limit(xs []string, n int) string {
	if len(xs) <= n {
		return strings.Join(xs, "; ")
	}
	return strings.Join(xs[:n], "; ") + fmt.Sprintf("; and %d more", len(xs)-n)
}

// proxyChecks are the checks of the proxies, from every controller
// replica's debug API (a warning, not a failure, when it cannot be read:
// the user may lack trellis-debug-reader).
func proxyChecks(ctx context.Context, d *debugFlags, errOut io.Writer, now time.Time) []checkResult {
	conn, err := d.connect(ctx, errOut)
	if err == nil {
		defer conn.Close()
		var rep *statusReport
		if rep, err = proxyStatus(ctx, conn); err == nil {
			rep.NotConnected = conn.notConnected(ctx, "", rep.Proxies)
			return proxyResults(rep, now)
		}
	}
	return []checkResult{{warn: true, what: "proxies: cannot read the controller's debug API: " + strings.SplitN(err.Error(), "\n", 2)[0],
		fix: "bind the ClusterRole and Role trellis-debug-reader to yourself to check the proxies too (or pass --controller-address)"}}
}

func proxyResults(rep *statusReport, now time.Time) []checkResult {
	var out []checkResult
	var nacked, expiring []string
	for _, p := range rep.Proxies {
		for _, t := range statusTypes {
			if p.States[t.short] == "NACKED" {
				nacked = append(nacked, fmt.Sprintf("%s/%s (%s)", p.Namespace, p.Pod, t.short))
			}
		}
		if p.CertificateExpiry != nil && p.CertificateExpiry.Sub(now) < 5*time.Minute {
			expiring = append(expiring, fmt.Sprintf("%s/%s (%s)", p.Namespace, p.Pod, expiry(p.CertificateExpiry)))
		}
	}
	out = append(out, checkResult{ok: true, what: fmt.Sprintf("proxies: %d connected", len(rep.Proxies))})
	if len(rep.NotConnected) > 0 {
		out = append(out, checkResult{what: fmt.Sprintf("%d injected %s connected to no controller replica: %s", len(rep.NotConnected), plural(len(rep.NotConnected), "pod"), limit(rep.NotConnected, 5)),
			fix: "their sidecars cannot reach or authenticate to trellis-xds: kubectl logs POD -c trellis-proxy"})
	}
	if len(nacked) > 0 {
		out = append(out, checkResult{what: fmt.Sprintf("%d proxy rejections: %s", len(nacked), limit(nacked, 5)),
			fix: "trellisctl proxy-status shows each rejection and the objects behind it"})
	} else {
		out = append(out, checkResult{ok: true, what: "no proxy rejected its configuration"})
	}
	if len(expiring) > 0 {
		out = append(out, checkResult{what: fmt.Sprintf("%d proxies' certificates expire within 5 minutes: %s", len(expiring), limit(expiring, 5)),
			fix: "renewal is failing: the controller logs \"issue workload certificate; retrying\" with the reason"})
	}
	return out
}

// webhookAnswers creates a pod in a meshed namespace as a server-side dry
// run (nothing is stored; admission webhooks run, the injection webhook
// declares no side effects): the injection webhook answers when the pod
// comes back with its sidecar.
func webhookAnswers(ctx context.Context, c client.Client, meshed []corev1.Namespace) checkResult {
	ns := ""
	for _, n := range meshed {
		if n.DeletionTimestamp == nil && n.Status.Phase != corev1.NamespaceTerminating {
			ns = n.Name
			break
		}
	}
	if ns == "" {
		return checkResult{warn: true, what: "injection webhook not tried: no meshed namespace", fix: "label a namespace trellis.dev/inject=enabled"}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: "trellisctl-check-"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "trellisctl-check"}}},
	}
	err := c.Create(ctx, pod, client.DryRunAll)
	switch {
	case apierrors.IsForbidden(err) && !strings.Contains(err.Error(), "webhook"):
		return checkResult{warn: true, what: "injection webhook not tried: you may not create pods in " + ns, fix: "check runs a server-side dry-run pod creation (nothing is created)"}
	case err != nil:
		return checkResult{what: "injection webhook does not answer: " + err.Error(),
			fix: "pods in meshed namespaces are not created while it fails (failurePolicy Fail): kubectl -n trellis-system get pods,endpoints trellis-webhook"}
	case pod.Annotations[inject.AnnotationStatus] != "injected":
		return checkResult{what: "a dry-run pod in " + ns + " came back without a sidecar",
			fix: "the injection webhook did not see it (namespaceSelector or objectSelector of trellis-injection) or ignored its failure (failurePolicy Ignore)"}
	}
	return checkResult{ok: true, what: "injection webhook answers: a dry-run pod in " + ns + " gets its sidecar"}
}
