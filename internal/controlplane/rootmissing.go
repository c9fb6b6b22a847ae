package controlplane

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// ReplacedRootAnnotation is set on a trellis-ca Secret created while the
// control plane's trust bundle (ConfigMap trellis-root-ca) still named
// other roots: the Secret was lost while no replica held the root (a
// replica that holds it restores the Secret instead), so a new root had
// to be minted and proxies started before trust only the old one. Its
// value names the replaced roots' fingerprints and when. While it is there
// MeshConfig says Programmed=False CARootMissing; the operator removes it
// once the old pods are restarted.
const ReplacedRootAnnotation = "trellis.dev/replaced-root"

// replacedRootAnnotations are the annotations a newly created root Secret
// gets: ReplacedRootAnnotation when the trust bundle names roots (none on a
// first install).
func (cp *ControlPlane) replacedRootAnnotations(ctx context.Context) map[string]string {
	var cm corev1.ConfigMap
	if err := cp.direct.Get(ctx, client.ObjectKey{Namespace: cp.opts.Namespace, Name: controller.RootCAConfigMap}, &cm); err != nil {
		return nil
	}
	var fps []string
	rest := []byte(cm.Data[controller.RootCAKey])
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			sum := sha256.Sum256(b.Bytes)
			fps = append(fps, "sha256:"+hex.EncodeToString(sum[:]))
		}
	}
	if len(fps) == 0 {
		return nil
	}
	return map[string]string{ReplacedRootAnnotation: fmt.Sprintf("%s (trusted by the mesh when this root was created, %s)", strings.Join(fps, ", "), cp.opts.Clock.Now().UTC().Format(time.RFC3339))}
}

// rootReplaced watches the root Secret's ReplacedRootAnnotation (every
// replica, every root-rotation tick, from the read RootRotation.Sync makes)
// and reports it on MeshConfig, with a log line and a Warning Event when it
// first appears.
type rootReplaced struct {
	cp       *ControlPlane
	mu       sync.Mutex
	reported string
}

func (r *rootReplaced) observe(s *corev1.Secret) {
	cp := r.cp
	replaced := s.Annotations[ReplacedRootAnnotation]
	r.mu.Lock()
	first := replaced != "" && replaced != r.reported
	r.reported = replaced
	r.mu.Unlock()
	if replaced == "" {
		cp.Reconciler.SetCAProblems(nil)
		return
	}
	msg := fmt.Sprintf("Secret %s/%s was missing while no replica held the mesh root, so a new root (sha256:%s) replaced %s. "+
		"Proxies started before trust only the old root: they cannot reach the control plane or workloads started since. "+
		"Restart the pods of meshed namespaces started before (kubectl rollout restart), then remove the annotation %s from the Secret; "+
		"or, to keep the old root, restore the old Secret from a backup and restart the controller.",
		cp.opts.Namespace, ca.RootSecretName, ca.Fingerprint(cp.Authority), replaced, ReplacedRootAnnotation)
	if first {
		cp.opts.Log.Error(nil, "the mesh root was replaced without rotation", "reason", meshv1alpha1.ReasonCARootMissing, "detail", msg)
		cp.Manager.GetEventRecorderFor("trellis-controller").Event(s, corev1.EventTypeWarning, meshv1alpha1.ReasonCARootMissing, msg)
	}
	cp.Reconciler.SetCAProblems([]model.Problem{{
		Object: model.Ref{Kind: "MeshConfig", Name: meshv1alpha1.MeshConfigName}, Condition: meshv1alpha1.ConditionProgrammed,
		Reason: meshv1alpha1.ReasonCARootMissing, Message: msg,
	}})
}
