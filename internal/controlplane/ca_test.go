package controlplane_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"sync"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
)

func TestRootSecretIsCreatedOnceByConcurrentReplicas(t *testing.T) {
	ns := env.Namespace(t, nil)
	clk := clocktesting.NewFakeClock(time.Now())
	const replicas = 4
	roots := make([]*ca.Authority, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := ca.LoadOrCreate(context.Background(), env.Client, ns, ca.RootSecretName, "cluster.local", clk, nil)
			if err != nil {
				t.Error(err)
				return
			}
			roots[i] = a
		}()
	}
	wg.Wait()
	for i := 1; i < replicas; i++ {
		if roots[i] == nil || roots[0] == nil || !roots[i].Root().Equal(roots[0].Root()) {
			t.Fatalf("replica %d uses a different root", i)
		}
	}
	// A restart loads the same root.
	again, err := ca.LoadOrCreate(context.Background(), env.Client, ns, ca.RootSecretName, "cluster.local", clk, nil)
	if err != nil || !again.Root().Equal(roots[0].Root()) {
		t.Fatalf("restart: %v", err)
	}
}

func TestTrustBundlePublishedInMeshedNamespaces(t *testing.T) {
	p := startPlane(t, nil)
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	plain := env.Namespace(t, nil)
	deadline := time.Now().Add(wait)
	var cm corev1.ConfigMap
	for {
		err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: meshed, Name: "trellis-root-ca"}, &cm)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no trellis-root-ca in the meshed namespace: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if cm.Data["root-cert.pem"] != string(p.Authority.RootPEM()) {
		t.Error("the ConfigMap does not hold the mesh root")
	}
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: plain, Name: "trellis-root-ca"}, &cm); !apierrors.IsNotFound(err) {
		t.Errorf("an unlabelled namespace got the ConfigMap (err %v)", err)
	}
}

// TestNoWorkloadKeyIsStored issues certificates to connected proxies, then
// reads every Secret and ConfigMap in the apiserver: no private key found
// there matches a workload certificate, and no ConfigMap holds any key.
func TestNoWorkloadKeyIsStored(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 80)
	var workloadKeys [][]byte
	for i, pod := range []*corev1.Pod{w.frontend, w.other} {
		sa := map[int]string{0: "frontend", 1: "other"}[i]
		c := p.connect(t, pod, token(t, pod, sa), nodeID(pod), i == 1)
		if err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
			return res[resource.SecretType]["default"] != nil
		}); err != nil {
			t.Fatal(err)
		}
		res, _ := c.Snapshot()
		sec := res[resource.SecretType]["default"].(*tlsv3.Secret)
		b, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := x509.MarshalPKIXPublicKey(cert.PublicKey)
		workloadKeys = append(workloadKeys, pub)
	}
	var secrets corev1.SecretList
	if err := env.Client.List(context.Background(), &secrets); err != nil {
		t.Fatal(err)
	}
	var cms corev1.ConfigMapList
	if err := env.Client.List(context.Background(), &cms); err != nil {
		t.Fatal(err)
	}
	keysIn := func(data []byte) [][]byte {
		var out [][]byte
		for {
			var b *pem.Block
			b, data = pem.Decode(data)
			if b == nil {
				return out
			}
			if strings.Contains(b.Type, "PRIVATE KEY") {
				k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
				if err != nil {
					k, err = x509.ParseECPrivateKey(b.Bytes)
				}
				if err != nil {
					out = append(out, []byte("unparsable"))
					continue
				}
				pub, _ := x509.MarshalPKIXPublicKey(k.(interface{ Public() crypto.PublicKey }).Public())
				out = append(out, pub)
			}
		}
	}
	found := 0
	for _, s := range secrets.Items {
		for _, v := range s.Data {
			for _, k := range keysIn(v) {
				found++
				for _, wk := range workloadKeys {
					if bytes.Equal(k, wk) {
						t.Errorf("Secret %s/%s holds a workload private key", s.Namespace, s.Name)
					}
				}
			}
		}
	}
	for _, cm := range cms.Items {
		for k, v := range cm.Data {
			if len(keysIn([]byte(v))) > 0 {
				t.Errorf("ConfigMap %s/%s key %s holds a private key", cm.Namespace, cm.Name, k)
			}
		}
	}
	if found == 0 {
		t.Error("not even the CA root key was found: the scan does not work")
	}
}

// TestCAHealsDeletedObjects: a deleted trellis-ca Secret comes back with the
// same root (from memory; a new root would cut every workload off) and a
// Warning Event; a deleted trellis-root-ca ConfigMap is recreated at once.
func TestCAHealsDeletedObjects(t *testing.T) {
	p := startPlane(t, nil, func(o *controlplane.Options) { o.RootRotationTick = 100 * time.Millisecond })
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(wait)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not after %s", what, wait)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	cmKey := client.ObjectKey{Namespace: meshed, Name: "trellis-root-ca"}
	waitFor("trust bundle published", func() bool { return env.Client.Get(context.Background(), cmKey, &corev1.ConfigMap{}) == nil })
	if err := env.Client.Delete(context.Background(), &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: "trellis-root-ca"}}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var cm corev1.ConfigMap
	waitFor("trust bundle recreated", func() bool {
		return env.Client.Get(context.Background(), cmKey, &cm) == nil && cm.DeletionTimestamp == nil && strings.Contains(cm.Data["root-cert.pem"], "BEGIN CERTIFICATE")
	})
	t.Logf("trellis-root-ca recreated %s after its deletion", time.Since(start).Round(time.Millisecond))

	secretKey := client.ObjectKey{Namespace: "trellis-system", Name: ca.RootSecretName}
	var before corev1.Secret
	if err := env.Client.Get(context.Background(), secretKey, &before); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Delete(context.Background(), &before); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	var after corev1.Secret
	waitFor("trellis-ca restored", func() bool {
		return env.Client.Get(context.Background(), secretKey, &after) == nil && after.UID != before.UID
	})
	t.Logf("trellis-ca restored %s after its deletion", time.Since(start).Round(time.Millisecond))
	if !bytes.Equal(after.Data[corev1.TLSCertKey], before.Data[corev1.TLSCertKey]) || !bytes.Equal(after.Data[corev1.TLSPrivateKeyKey], before.Data[corev1.TLSPrivateKeyKey]) {
		t.Error("trellis-ca came back with another root")
	}
	if !bytes.Equal(after.Data[corev1.TLSCertKey], p.Authority.RootPEM()) {
		t.Error("trellis-ca does not hold the root the control plane signs with")
	}
	var events corev1.EventList
	waitFor("a CARootRestored event", func() bool {
		if env.Client.List(context.Background(), &events, client.InNamespace("trellis-system")) != nil {
			return false
		}
		for _, e := range events.Items {
			if e.Reason == "CARootRestored" && e.InvolvedObject.Name == ca.RootSecretName {
				return true
			}
		}
		return false
	})
}

// TestCARootMissingAtStartIsLoud: the control plane starts with no
// trellis-ca Secret while its namespace's trust bundle names a root (the
// Secret was lost while no replica ran). A new root has to be minted — the
// old key is gone — but never silently: the new Secret carries the replaced
// root's fingerprint, MeshConfig says Programmed=False CARootMissing with
// what to do, and a Warning Event is recorded; once the operator removes
// the annotation, MeshConfig is Programmed again.
func TestCARootMissingAtStartIsLoud(t *testing.T) {
	ns := env.Namespace(t, nil)
	old, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(context.Background(), &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-root-ca"}, Data: map[string]string{"root-cert.pem": string(old.RootPEM())}}); err != nil {
		t.Fatal(err)
	}
	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}}
	if err := env.Client.Create(context.Background(), mc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), mc) })
	p := startPlane(t, nil, func(o *controlplane.Options) { o.Namespace, o.RootRotationTick = ns, 100*time.Millisecond })

	var s corev1.Secret
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: ca.RootSecretName}, &s); err != nil {
		t.Fatal(err)
	}
	if got := s.Annotations[controlplane.ReplacedRootAnnotation]; !strings.Contains(got, "sha256:"+ca.Fingerprint(old)) {
		t.Errorf("the new root Secret's %s: %q, want the replaced root's fingerprint", controlplane.ReplacedRootAnnotation, got)
	}
	programmed := func() *metav1.Condition {
		var got meshv1alpha1.MeshConfig
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: meshv1alpha1.MeshConfigName}, &got); err != nil {
			return nil
		}
		return meta.FindStatusCondition(got.Status.Conditions, meshv1alpha1.ConditionProgrammed)
	}
	until := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(wait)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not after %s (Programmed %+v)", what, wait, programmed())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	until("MeshConfig Programmed=False CARootMissing", func() bool {
		c := programmed()
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == meshv1alpha1.ReasonCARootMissing &&
			strings.Contains(c.Message, ca.Fingerprint(old)) && strings.Contains(c.Message, "rollout restart") && strings.Contains(c.Message, ca.Fingerprint(p.Authority))
	})
	t.Logf("MeshConfig: %s", programmed().Message)
	until("a CARootMissing Warning Event on the Secret", func() bool {
		var events corev1.EventList
		if env.Client.List(context.Background(), &events, client.InNamespace(ns)) != nil {
			return false
		}
		for _, e := range events.Items {
			if e.Reason == meshv1alpha1.ReasonCARootMissing && e.Type == corev1.EventTypeWarning && e.InvolvedObject.Name == ca.RootSecretName {
				return true
			}
		}
		return false
	})
	delete(s.Annotations, controlplane.ReplacedRootAnnotation)
	if err := env.Client.Update(context.Background(), &s); err != nil {
		t.Fatal(err)
	}
	until("MeshConfig Programmed again", func() bool {
		c := programmed()
		return c != nil && c.Status == metav1.ConditionTrue
	})
}
