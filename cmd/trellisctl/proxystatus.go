package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/pkg/inject"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// The xDS types in the order proxy-status shows them.
var statusTypes = []struct{ short, typeURL string }{
	{"CDS", resource.ClusterType}, {"LDS", resource.ListenerType}, {"EDS", resource.EndpointType},
	{"RDS", resource.RouteType}, {"SDS", resource.SecretType},
}

// proxyRow is one proxy as proxy-status prints it.
type proxyRow struct {
	xds.ProxyStatus
	// Replica is the controller replica the proxy is connected to.
	Replica string `json:"replica"`
	// States by short type name: SYNCED, NACKED, STALE (xds.ProxyStatus.State).
	States map[string]string `json:"states"`
}

// statusReport is proxy-status's whole answer.
type statusReport struct {
	Proxies []proxyRow `json:"proxies"`
	// NotConnected are pods with an injected proxy that no replica serves.
	NotConnected []string `json:"notConnected,omitempty"`
}

func newProxyStatus() *cobra.Command {
	d := newDebugFlags()
	var output string
	var all bool
	cmd := &cobra.Command{
		Use:   "proxy-status [POD]",
		Short: "Show every connected proxy's sync state per xDS type, or one proxy's in detail",
		Long: `proxy-status asks every controller replica which proxies are connected to it and shows, per
proxy, its class and for each xDS type whether it accepted what the control plane sent last:

  SYNCED  it ACKed the version sent last (the latest the control plane has for it)
  STALE   the version sent last is not ACKed yet (in flight, or the proxy is slow)
  NACKED  it rejected the version sent last and keeps running the one before; the line under the
          table says what it said, which served resources its message names, and which
          Kubernetes objects those come from (look there first)

With POD, that proxy in detail: versions sent and ACKed per type, its certificate, the last
rejection. Pods whose proxy was injected but is connected to no replica are listed too (when
you may list pods).

It reads the controller's debug API on its metrics port (HTTPS, verified with the mesh's trust
bundle) as your kubeconfig user: bind the ClusterRole trellis-debug-reader, and the Role of the
same name in the Trellis namespace for the port-forward.`,
		Example: `  trellisctl proxy-status
  trellisctl proxy-status -n shop reviews-v1-7d9f8
  trellisctl proxy-status --controller-address 127.0.0.1:8443   # after kubectl port-forward`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !slices.Contains([]string{"table", "yaml", "json"}, output) {
				return usageError(cmd, "--output must be table, yaml or json")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), d.timeout)
			defer cancel()
			conn, err := d.connect(ctx, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer conn.Close()
			rep, err := proxyStatus(ctx, conn)
			if err != nil {
				return err
			}
			ns := d.namespace()
			if len(args) == 1 {
				i := slices.IndexFunc(rep.Proxies, func(p proxyRow) bool { return p.Namespace == ns && p.Pod == args[0] })
				if i < 0 {
					return fmt.Errorf("no proxy of pod %s/%s is connected to the control plane (%d replicas asked)", ns, args[0], len(conn.replicas))
				}
				return printProxy(cmd.OutOrStdout(), rep.Proxies[i], output)
			}
			if !all && d.kube.Namespace != nil && *d.kube.Namespace != "" {
				rep.Proxies = slices.DeleteFunc(rep.Proxies, func(p proxyRow) bool { return p.Namespace != ns })
			}
			listNS := ""
			if !all && d.kube.Namespace != nil && *d.kube.Namespace != "" {
				listNS = ns
			}
			rep.NotConnected = conn.notConnected(ctx, listNS, rep.Proxies)
			return printStatus(cmd.OutOrStdout(), rep, output)
		},
	}
	d.add(cmd.Flags())
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table, yaml or json")
	cmd.Flags().BoolVarP(&all, "all-namespaces", "A", false, "every namespace (the default unless -n is given)")
	return cmd
}

// proxyStatus merges the proxies of every replica.
func proxyStatus(ctx context.Context, conn *debugConn) (*statusReport, error) {
	rep := &statusReport{Proxies: []proxyRow{}}
	for _, r := range conn.replicas {
		var resp struct {
			Proxies []xds.ProxyStatus `json:"proxies"`
		}
		if err := conn.get(ctx, r, xds.DebugProxiesPath, nil, &resp); err != nil {
			return nil, err
		}
		for _, p := range resp.Proxies {
			row := proxyRow{ProxyStatus: p, Replica: r.name, States: map[string]string{}}
			for _, t := range statusTypes {
				if _, sent := p.Sent[t.typeURL]; sent || p.NACKs[t.typeURL] != nil {
					row.States[t.short] = p.State(t.typeURL)
				}
			}
			rep.Proxies = append(rep.Proxies, row)
		}
	}
	slices.SortFunc(rep.Proxies, func(a, b proxyRow) int {
		return strings.Compare(a.Namespace+"/"+a.Pod+"/"+a.Protocol, b.Namespace+"/"+b.Pod+"/"+b.Protocol)
	})
	return rep, nil
}

// notConnected lists running pods with an injected proxy (sidecar or
// proxyless) that no replica has a stream from; nil when pods cannot be
// listed.
func (c *debugConn) notConnected(ctx context.Context, namespace string, proxies []proxyRow) []string {
	pods, err := c.kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{FieldSelector: "status.phase=Running"})
	if err != nil {
		return nil
	}
	var out []string
	for _, p := range pods.Items {
		if p.Annotations[inject.AnnotationStatus] != "injected" || p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
			continue
		}
		if !slices.ContainsFunc(proxies, func(r proxyRow) bool { return r.Namespace == p.Namespace && r.Pod == p.Name }) {
			out = append(out, p.Namespace+"/"+p.Name)
		}
	}
	return out
}

func printStatus(w io.Writer, rep *statusReport, output string) error {
	if output != "table" {
		return printStructured(w, rep, output)
	}
	if len(rep.Proxies) == 0 {
		fmt.Fprintln(w, "no proxy is connected")
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if len(rep.Proxies) > 0 {
		fmt.Fprintln(tw, "NAMESPACE\tPOD\tMODE\tCDS\tLDS\tEDS\tRDS\tSDS\tCERT EXPIRES\tREPLICA")
	}
	for _, p := range rep.Proxies {
		cols := []string{p.Namespace, p.Pod, p.Protocol}
		for _, t := range statusTypes {
			cols = append(cols, cmp.Or(p.States[t.short], "-"))
		}
		cols = append(cols, expiry(p.CertificateExpiry), p.Replica)
		fmt.Fprintln(tw, strings.Join(cols, "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, p := range rep.Proxies {
		for _, t := range statusTypes {
			if p.States[t.short] == "NACKED" {
				fmt.Fprintf(w, "\n✘ %s/%s rejected %s version %s:\n", p.Namespace, p.Pod, t.short, p.NACKs[t.typeURL].Version)
				printNACK(w, p.NACKs[t.typeURL], "  ")
			}
		}
	}
	if len(rep.NotConnected) > 0 {
		fmt.Fprintf(w, "\n! injected but connected to no controller replica: %s\n", strings.Join(rep.NotConnected, ", "))
		fmt.Fprintln(w, "  → the sidecar cannot reach or authenticate to trellis-xds: kubectl logs POD -c trellis-proxy")
	}
	return nil
}

func printNACK(w io.Writer, n *xds.NACK, indent string) {
	fmt.Fprintf(w, "%s%s\n", indent, n.Message)
	if len(n.Resources) > 0 {
		fmt.Fprintf(w, "%sresources: %s\n", indent, strings.Join(n.Resources, ", "))
	}
	for _, o := range n.Objects {
		fmt.Fprintf(w, "%scaused by %s → kubectl describe %s\n", indent, o.String(), kubectlRef(o.Kind, o.Namespace, o.Name))
	}
	if len(n.Objects) == 0 {
		fmt.Fprintf(w, "%s(the message names no served resource Trellis can trace to an object)\n", indent)
	}
}

// kubectlRef is how kubectl names an object: "-n ns kind name".
func kubectlRef(kind, ns, name string) string {
	k := strings.ToLower(kind)
	if ns == "" {
		return k + " " + name
	}
	return "-n " + ns + " " + k + " " + name
}

func printProxy(w io.Writer, p proxyRow, output string) error {
	if output != "table" {
		return printStructured(w, p, output)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Pod:\t%s/%s\n", p.Namespace, p.Pod)
	fmt.Fprintf(tw, "Node ID:\t%s\n", p.NodeID)
	fmt.Fprintf(tw, "Service account:\t%s\n", p.ServiceAccount)
	fmt.Fprintf(tw, "Identity:\t%s\n", cmp.Or(p.Identity, "(no certificate served yet)"))
	fmt.Fprintf(tw, "Certificate expires:\t%s\n", expiry(p.CertificateExpiry))
	fmt.Fprintf(tw, "Class:\t%s\n", p.Class)
	fmt.Fprintf(tw, "Stream:\t%s, connected %s ago to %s\n", p.Protocol, time.Since(p.ConnectedAt).Round(time.Second), p.Replica)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TYPE\tSTATE\tSENT\tACKED")
	for _, t := range statusTypes {
		if s, ok := p.States[t.short]; ok {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.short, s, p.Sent[t.typeURL], cmp.Or(p.Acked[t.typeURL], "-"))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if n := p.LastNACK; n != nil {
		state := "still in force: the proxy runs the version before"
		if p.Acked[n.Type] == "" {
			state = "still in force: the proxy has accepted no version of this type"
		}
		if p.NACKs[n.Type] == nil {
			state = "since then a later version was accepted"
		}
		fmt.Fprintf(w, "\nLast rejection (%s version %s, %s ago; %s):\n", shortTypeName(n.Type), n.Version, time.Since(n.At).Round(time.Second), state)
		printNACK(w, n, "  ")
	}
	return nil
}

func shortTypeName(typeURL string) string {
	for _, t := range statusTypes {
		if t.typeURL == typeURL {
			return t.short
		}
	}
	return typeURL
}

func expiry(t *time.Time) string {
	if t == nil {
		return "-"
	}
	d := time.Until(*t).Round(time.Minute)
	if d <= 0 {
		return "EXPIRED " + t.UTC().Format(time.RFC3339)
	}
	return "in " + d.String()
}

// printStructured prints v as indented JSON or as YAML (-o json|yaml).
func printStructured(w io.Writer, v any, output string) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if output == "yaml" {
		if b, err = yaml.JSONToYAML(b); err != nil {
			return err
		}
	} else {
		b = append(b, '\n')
	}
	_, err = w.Write(b)
	return err
}
