package controller

import (
	"testing"

	"github.com/trellis-mesh/trellis/internal/testenv"
)

// env is a real kube-apiserver and etcd with the Trellis and Gateway API
// CRDs: the reconcilers' Reconcile, Sync and Step and the validator's
// Handle are called directly against it (kubebuilder's pattern), without a
// manager.
var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }
