package xds

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	authnclient "k8s.io/client-go/kubernetes/typed/authentication/v1"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NodeID is the parsed node id a proxy presents:
// <type>~<podIP>~<pod>.<namespace>~<namespace>.svc.cluster.local, the same
// shape as Istio's; type is "sidecar" (Envoy) or "grpc" (proxyless).
type NodeID struct {
	Type      string
	IP        string
	Pod       string
	Namespace string
}

func (n NodeID) String() string {
	return n.Type + "~" + n.IP + "~" + n.Pod + "." + n.Namespace + "~" + n.Namespace + ".svc.cluster.local"
}

// ParseNodeID parses a node id; pod names may contain dots, namespaces may not.
func ParseNodeID(id string) (NodeID, error) {
	parts := strings.Split(id, "~")
	if len(parts) != 4 {
		return NodeID{}, fmt.Errorf("node id %q is not <type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local", id)
	}
	i := strings.LastIndexByte(parts[2], '.')
	if i <= 0 || i == len(parts[2])-1 {
		return NodeID{}, fmt.Errorf("node id %q: %q is not <pod>.<namespace>", id, parts[2])
	}
	n := NodeID{Type: parts[0], IP: parts[1], Pod: parts[2][:i], Namespace: parts[2][i+1:]}
	if n.Type != "sidecar" && n.Type != "grpc" {
		return NodeID{}, fmt.Errorf("node id %q: type %q is not sidecar or grpc", id, n.Type)
	}
	if parts[3] != n.Namespace+".svc.cluster.local" {
		return NodeID{}, fmt.Errorf("node id %q: domain %q does not match namespace %q", id, parts[3], n.Namespace)
	}
	return n, nil
}

// Identity is a proxy the control plane verified.
type Identity struct {
	NodeID         NodeID
	ServiceAccount string
	PodUID         types.UID
}

// Authenticator verifies a proxy: its projected ServiceAccount token through
// a TokenReview (cached until shortly before the token expires), the pod the
// token is bound to, and that the node id names that pod, its IP and — when
// VerifyPeerIP — the address the connection comes from.
type Authenticator struct {
	TokenReviews authnclient.TokenReviewInterface
	// Pods reads pods, normally from the manager's informer cache.
	Pods         client.Reader
	Audience     string
	VerifyPeerIP bool
	Clock        clock.PassiveClock
	// CacheTTL bounds how long a successful review is reused.
	CacheTTL time.Duration
	// ReviewTimeout bounds one TokenReview call (default
	// DefaultReviewTimeout): a hung apiserver fails the stream with
	// Unavailable, and the proxy retries, instead of holding it open.
	ReviewTimeout time.Duration
	// OnCache is called with "hit" or "miss" for metrics.
	OnCache func(result string)

	mu    sync.Mutex
	cache map[[32]byte]cachedReview
}

type cachedReview struct {
	user    authnv1.UserInfo
	expires time.Time
}

// DefaultReviewTimeout is Authenticator.ReviewTimeout's default.
const DefaultReviewTimeout = 10 * time.Second

const (
	extraPodName = "authentication.kubernetes.io/pod-name"
	extraPodUID  = "authentication.kubernetes.io/pod-uid"
)

// Authenticate returns the verified identity, or a gRPC status error:
// Unauthenticated for a missing or invalid token, PermissionDenied when the
// token is valid but does not match the node id, the pod or the peer.
func (a *Authenticator) Authenticate(ctx context.Context, token, peerIP, nodeID string) (*Identity, error) {
	if token == "" {
		return nil, status.Error(codes.Unauthenticated, "no ServiceAccount token: send the pod's projected token as 'authorization: Bearer <token>'")
	}
	node, err := ParseNodeID(nodeID)
	if err != nil {
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
	user, err := a.review(ctx, token)
	if err != nil {
		return nil, err
	}
	ns, sa, ok := parseServiceAccountUser(user.Username)
	if !ok {
		return nil, status.Errorf(codes.Unauthenticated, "token of %q is not a ServiceAccount token", user.Username)
	}
	podName, podUID := first(user.Extra[extraPodName]), first(user.Extra[extraPodUID])
	if podName == "" {
		return nil, status.Error(codes.Unauthenticated, "token is not bound to a pod: use a projected ServiceAccount token")
	}
	if ns != node.Namespace || podName != node.Pod {
		return nil, status.Errorf(codes.PermissionDenied, "node id names pod %s/%s but the token is bound to pod %s/%s", node.Namespace, node.Pod, ns, podName)
	}
	var pod corev1.Pod
	if err := a.Pods.Get(ctx, client.ObjectKey{Namespace: ns, Name: podName}, &pod); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, status.Errorf(codes.PermissionDenied, "pod %s/%s does not exist", ns, podName)
		}
		return nil, status.Errorf(codes.Unavailable, "look up pod %s/%s: %v", ns, podName, err)
	}
	if podUID != "" && string(pod.UID) != podUID {
		return nil, status.Errorf(codes.PermissionDenied, "pod %s/%s was recreated: the token is bound to uid %s", ns, podName, podUID)
	}
	if pod.DeletionTimestamp != nil {
		return nil, status.Errorf(codes.PermissionDenied, "pod %s/%s is being deleted", ns, podName)
	}
	if got := pod.Spec.ServiceAccountName; got != sa && !(got == "" && sa == "default") {
		return nil, status.Errorf(codes.PermissionDenied, "pod %s/%s runs as ServiceAccount %q, the token is for %q", ns, podName, got, sa)
	}
	if !podHasIP(&pod, node.IP) {
		return nil, status.Errorf(codes.PermissionDenied, "node id IP %s is not an IP of pod %s/%s", node.IP, ns, podName)
	}
	if a.VerifyPeerIP && peerIP != node.IP {
		return nil, status.Errorf(codes.PermissionDenied, "connection from %s, but pod %s/%s has IP %s", peerIP, ns, podName, node.IP)
	}
	return &Identity{NodeID: node, ServiceAccount: sa, PodUID: pod.UID}, nil
}

func first(ss authnv1.ExtraValue) string {
	if len(ss) == 0 {
		return ""
	}
	return ss[0]
}

func podHasIP(p *corev1.Pod, ip string) bool {
	if p.Status.PodIP == ip && ip != "" {
		return true
	}
	for _, pip := range p.Status.PodIPs {
		if pip.IP == ip {
			return true
		}
	}
	return false
}

func parseServiceAccountUser(u string) (ns, sa string, ok bool) {
	parts := strings.Split(u, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return "", "", false
	}
	return parts[2], parts[3], true
}

func (a *Authenticator) review(ctx context.Context, token string) (authnv1.UserInfo, error) {
	key := sha256.Sum256([]byte(token))
	now := a.Clock.Now()
	a.mu.Lock()
	if a.cache == nil {
		a.cache = map[[32]byte]cachedReview{}
	}
	if c, ok := a.cache[key]; ok && now.Before(c.expires) {
		a.mu.Unlock()
		a.count("hit")
		return c.user, nil
	}
	a.mu.Unlock()
	a.count("miss")
	ctx, cancel := context.WithTimeout(ctx, cmp.Or(a.ReviewTimeout, DefaultReviewTimeout))
	defer cancel()
	tr, err := a.TokenReviews.Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{a.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		return authnv1.UserInfo{}, status.Errorf(codes.Unavailable, "TokenReview: %v", err)
	}
	if !tr.Status.Authenticated {
		msg := tr.Status.Error
		if msg == "" {
			msg = "token rejected"
		}
		return authnv1.UserInfo{}, status.Errorf(codes.Unauthenticated, "invalid ServiceAccount token: %s", msg)
	}
	audOK := false
	for _, aud := range tr.Status.Audiences {
		audOK = audOK || aud == a.Audience
	}
	if !audOK {
		return authnv1.UserInfo{}, status.Errorf(codes.Unauthenticated, "token audience is not %q", a.Audience)
	}
	expires := now.Add(a.CacheTTL)
	if exp, ok := tokenExpiry(token); ok && exp.Before(expires) {
		expires = exp
	}
	a.mu.Lock()
	// Drop expired entries as we go so the cache stays bounded by live tokens.
	for k, c := range a.cache {
		if !now.Before(c.expires) {
			delete(a.cache, k)
		}
	}
	a.cache[key] = cachedReview{user: tr.Status.User, expires: expires}
	a.mu.Unlock()
	return tr.Status.User, nil
}

func (a *Authenticator) count(result string) {
	if a.OnCache != nil {
		a.OnCache(result)
	}
}

// tokenExpiry reads the exp claim of a JWT without verifying it; it only
// bounds how long a review the apiserver made is reused.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil || claims.Exp == 0 {
		return time.Time{}, false
	}
	return time.Unix(claims.Exp, 0), true
}
