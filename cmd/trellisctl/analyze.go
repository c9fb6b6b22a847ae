package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/trellis-mesh/trellis/pkg/analyze"
)

func newAnalyze() *cobra.Command {
	var (
		files     []string
		namespace string
		assume    bool
		output    string
		failOn    string
		live      = newLiveFlags()
	)
	cmd := &cobra.Command{
		Use:   "analyze (-f PATH... | --live)",
		Short: "Find what is wrong with mesh configuration, from manifests or a live cluster",
		Long: `analyze reads Kubernetes manifests (files or directories, recursively; - for standard
input) and reports what the Trellis controller would refuse or what would not do what it says:
the problems status conditions carry (same reasons), and common mistakes — Services selecting no
pods or unmeshed pods, ports whose protocol falls back to TCP, AccessPolicy sources that match
nobody, unmeshed workloads under Strict mTLS, fields the apiserver would reject.

No cluster is needed: workloads' pod templates go through the real injection webhook code,
Services get cluster IPs and endpoints as a cluster would give them, and the mesh model and every
meshed workload's Envoy configuration are built as the controller builds them.

--live reads the cluster of the kubeconfig instead, exactly what the controller reads (the same
lists, cluster-wide), and analyses it as it runs: real pods (injected or not), cluster IPs and
EndpointSlices; -n then keeps the findings of that namespace only.

Exit status: 0 when there is nothing at or above --fail-on, 1 otherwise (for CI and GitOps
pipelines), 2 on usage errors.`,
		Example: `  # The manifests of an app, before applying them
  trellisctl analyze -f deploy/

  # Rendered Helm output, as JSON for a pipeline
  helm template shop ./chart | trellisctl analyze -f - -n shop -o json

  # Also fail on warnings
  trellisctl analyze -f deploy/ --fail-on warning

  # What is wrong in the cluster now, in one namespace
  trellisctl analyze --live -n shop`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case live.live && len(files) > 0:
				return usageError(cmd, "-f and --live exclude each other: analyze manifests or the cluster")
			case !live.live && len(files) == 0:
				return usageError(cmd, "-f is required: name the manifests (a file, a directory, or - for standard input), or --live for the cluster")
			}
			switch failOn {
			case "error", "warning", "none":
			default:
				return usageError(cmd, fmt.Sprintf("--fail-on %q: write error, warning or none", failOn))
			}
			switch output {
			case "table", "json", "yaml":
			default:
				return usageError(cmd, fmt.Sprintf("-o %q: write table, json or yaml", output))
			}
			var rep *analyze.Report
			if live.live {
				cl, err := live.cluster(cmd.Context())
				if err != nil {
					return err
				}
				rep = cl.Report()
				if cmd.Flags().Changed("namespace") {
					rep.Findings = slices.DeleteFunc(rep.Findings, func(f analyze.Finding) bool { return f.Object.Namespace != namespace })
				}
			} else {
				objs, loadFindings, err := analyze.Load(files, namespace, cmd.InOrStdin())
				if err != nil {
					return err
				}
				rep = analyze.Run(objs, analyze.Options{AssumeInjection: assume})
				rep.Findings = append(loadFindings, rep.Findings...)
			}
			if err := printReport(cmd.OutOrStdout(), rep, output); err != nil {
				return err
			}
			errs, warns := count(rep)
			if (failOn == "error" && errs > 0) || (failOn == "warning" && errs+warns > 0) {
				return exitError{1}
			}
			return nil
		},
	}
	cmd.Flags().StringArrayVarP(&files, "filename", "f", nil, "manifests: a file, a directory (read recursively) or - for standard input; repeatable")
	cmd.Flags().StringVarP(&namespace, "namespace", "n", "default", "namespace of namespaced objects that name none (as kubectl apply -n)")
	cmd.Flags().BoolVar(&assume, "assume-injection", true, "treat namespaces the manifests do not define as labelled trellis.dev/inject=enabled")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	cmd.Flags().StringVar(&failOn, "fail-on", "error", "lowest severity that makes the exit status 1: error, warning or none")
	live.add(cmd.Flags(), "analyze the cluster of the kubeconfig instead of manifests")
	return cmd
}

// usageError prints the problem and the usage, exit status 2.
func usageError(cmd *cobra.Command, msg string) error {
	fmt.Fprintf(cmd.ErrOrStderr(), "Error: %s\n\n%s", msg, cmd.UsageString())
	return exitError{2}
}

func count(rep *analyze.Report) (errs, warns int) {
	for _, f := range rep.Findings {
		if f.Severity == analyze.Error {
			errs++
		} else {
			warns++
		}
	}
	return errs, warns
}

func printReport(w io.Writer, rep *analyze.Report, output string) error {
	if output != "table" && output != "" {
		return printStructured(w, rep, output)
	}
	for _, f := range rep.Findings {
		mark := "✘"
		if f.Severity == analyze.Warning {
			mark = "!"
		}
		where := f.Object.String()
		if f.Object.Kind == "" {
			where = f.Source
		} else if f.Source != "" {
			where += " (" + f.Source + ")"
		}
		if f.Field != "" {
			where += " " + f.Field
		}
		fmt.Fprintf(w, "%s %-7s %s [%s]\n    %s\n", mark, f.Severity, where, f.Reason, f.Message)
	}
	errs, warns := count(rep)
	summary := fmt.Sprintf("%d %s, %d %s; %d workloads and %d Services analysed", errs, plural(errs, "error"), warns, plural(warns, "warning"), rep.Workloads, rep.Services)
	if len(rep.Skipped) > 0 {
		var kinds []string
		for _, k := range slices.Sorted(maps.Keys(rep.Skipped)) {
			kinds = append(kinds, fmt.Sprintf("%s ×%d", k, rep.Skipped[k]))
		}
		summary += "; not read by the mesh: " + strings.Join(kinds, ", ")
	}
	if errs+warns == 0 {
		fmt.Fprintln(w, "✔ no problems found")
	}
	fmt.Fprintln(w, summary)
	return nil
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
