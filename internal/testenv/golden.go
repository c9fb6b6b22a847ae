package testenv

import (
	"os"
	"path/filepath"
	"testing"
)

// GoldenOrphans fails for each file matching pattern that is not in want
// (a golden output whose input is gone); with update it removes them.
func GoldenOrphans(t testing.TB, pattern string, want map[string]bool, update bool) {
	t.Helper()
	outs, err := filepath.Glob(pattern)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range outs {
		switch {
		case want[o]:
		case update:
			_ = os.Remove(o)
		default:
			t.Errorf("orphan golden file %s (run with -update to remove)", o)
		}
	}
}
