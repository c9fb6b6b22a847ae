package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// RootSecretName is the Secret, in the control plane's namespace, holding the
// built-in CA's root certificate and key.
const RootSecretName = "trellis-ca"

// RootValidity is how long a root created by the controller is valid.
const RootValidity = 10 * 365 * 24 * time.Hour

// CrossSignedKey is the Secret key holding the root cross-signed by the
// root it replaced (PEM); written by a root rotation, optional.
const CrossSignedKey = "cross-signed.crt"

// LoadSecret builds an authority from a root Secret's data: tls.crt,
// tls.key and, when present, the cross-signed root.
func LoadSecret(data map[string][]byte, clk clock.PassiveClock) (*Authority, error) {
	a, err := Load(data[corev1.TLSCertKey], data[corev1.TLSPrivateKeyKey], clk)
	if err != nil || len(data[CrossSignedKey]) == 0 {
		return a, err
	}
	b, _ := pem.Decode(data[CrossSignedKey])
	if b == nil {
		return nil, fmt.Errorf("%s is not PEM", CrossSignedKey)
	}
	cross, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CrossSignedKey, err)
	}
	// A Secret is input: a key type without Equal is refused, not a panic.
	key, ok := cross.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !bytes.Equal(cross.RawSubject, a.cert.RawSubject) || !ok || !key.Equal(a.cert.PublicKey) {
		return nil, fmt.Errorf("%s does not certify this root's key", CrossSignedKey)
	}
	a.cross = cross
	return a, nil
}

// Load builds an authority from a PEM certificate and PKCS#8 or EC key.
func Load(certPEM, keyPEM []byte, clk clock.PassiveClock) (*Authority, error) {
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, errors.New("root certificate or key is not PEM")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("root certificate: %w", err)
	}
	var key *ecdsa.PrivateKey
	if k, err := x509.ParsePKCS8PrivateKey(kb.Bytes); err == nil {
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, errors.New("root key is not ECDSA")
		}
		key = ek
	} else if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
		return nil, fmt.Errorf("root key: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("root certificate is not a CA")
	}
	return &Authority{cert: cert, key: key, clock: clk}, nil
}

// LoadOrCreate returns the built-in CA kept in the Secret namespace/name,
// creating it on first start. Two replicas starting together both try to
// create it; the apiserver accepts one and the other reads the winner's, so
// every replica signs with the same root.
func LoadOrCreate(ctx context.Context, c client.Client, namespace, name, trustDomain string, clk clock.PassiveClock, annotations map[string]string) (*Authority, error) {
	key := client.ObjectKey{Namespace: namespace, Name: name}
	for attempt := 0; attempt < 3; attempt++ {
		var s corev1.Secret
		err := c.Get(ctx, key, &s)
		if err == nil {
			a, err := LoadSecret(s.Data, clk)
			if err != nil {
				return nil, fmt.Errorf("secret %s/%s: %w", namespace, name, err)
			}
			return a, nil
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("read CA secret %s/%s: %w", namespace, name, err)
		}
		a, err := NewSelfSigned(trustDomain, RootValidity, clk)
		if err != nil {
			return nil, err
		}
		data, err := a.SecretData()
		if err != nil {
			return nil, err
		}
		s = corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: map[string]string{"app.kubernetes.io/managed-by": "trellis"}, Annotations: annotations},
			Type:       corev1.SecretTypeTLS,
			Data:       data,
		}
		err = c.Create(ctx, &s)
		if err == nil {
			return a, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("create CA secret %s/%s: %w", namespace, name, err)
		}
		// Another replica won the race: read its root.
	}
	return nil, fmt.Errorf("CA secret %s/%s: could not read or create it", namespace, name)
}

// SecretData is the authority as a kubernetes.io/tls Secret's data (what
// LoadSecret reads): root certificate, PKCS#8 key and, after a rotation,
// the cross-signed root.
func (a *Authority) SecretData() (map[string][]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(a.key)
	if err != nil {
		return nil, err
	}
	data := map[string][]byte{corev1.TLSCertKey: a.RootPEM(), corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})}
	if a.cross != nil {
		data[CrossSignedKey] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cross.Raw})
	}
	return data, nil
}
