// Command trellisctl is the operator's CLI for Trellis.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

// exitError carries an exit status without another message (the command
// printed what went wrong).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes trellisctl with args and returns the exit status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	err := root.Execute()
	var ee exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	default:
		fmt.Fprintln(stderr, "Error:", err)
		return 1
	}
}

func newRoot(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "trellisctl",
		Short: "Operate and debug a Trellis service mesh",
		Long: `trellisctl operates and debugs a Trellis service mesh.

  analyze            find what is wrong with mesh configuration, from manifests (no cluster needed)
  check [--pre]      can the cluster run Trellis (--pre); is the installed mesh healthy
  proxy-status       every connected proxy's sync state per xDS type, rejections and their cause
  config-dump POD    what the control plane serves a proxy; --from-file diffs it with Envoy's own
  describe request   follow one request through the sidecars, step by step (from manifests)
  top, edges         per-edge golden metrics (needs fleet telemetry, not built yet)
  version            print the client's version`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newAnalyze(), newCheck(), newConfigDump(), newDescribe(), newProxyStatus(), newTop("top"), newTop("edges"), newVersion())
	return root
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the client's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), "trellisctl", version)
			return nil
		},
	}
}
