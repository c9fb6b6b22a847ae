package model

import (
	"cmp"
	"strings"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// AccessPolicy is an AccessPolicy that resolved at least one target, with
// its sources resolved to SPIFFE identities.
type AccessPolicy struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Deny: a matching request is denied; else the policy allows.
	Deny bool `json:"deny,omitempty"`
	// Rules: a request matches the policy when it matches one.
	Rules []AccessRule `json:"rules"`
}

// AccessRule matches a request from one of From (any caller, plaintext
// too, when empty) for one of To (any operation when empty).
type AccessRule struct {
	// Index of the rule in spec.rules (a rule that can match no caller is
	// left out).
	Index int         `json:"index"`
	From  []Principal `json:"from,omitempty"`
	To    []Operation `json:"to,omitempty"`
}

// Principal is a caller identity from its mTLS certificate: exactly one
// field is set.
type Principal struct {
	// ID is one SPIFFE ID (a ServiceAccount).
	ID string `json:"id,omitempty"`
	// IDPrefix matches every identity of a namespace
	// ("spiffe://<trust domain>/ns/<namespace>/sa/").
	IDPrefix string `json:"idPrefix,omitempty"`
	// Authenticated matches any meshed caller.
	Authenticated bool `json:"authenticated,omitempty"`
}

// Matches says whether the identity id (a SPIFFE ID) is this principal.
func (p Principal) Matches(id string) bool {
	return p.Authenticated || (p.ID != "" && p.ID == id) || (p.IDPrefix != "" && strings.HasPrefix(id, p.IDPrefix))
}

// Operation matches what is requested; every set field must match.
type Operation struct {
	// Ports of the target Service.
	Ports []int32 `json:"ports,omitempty"`
	// Paths (Exact or PathPrefix, whole segments); HTTP ports only.
	Paths []PathMatch `json:"paths,omitempty"`
	// Methods; HTTP ports only.
	Methods []string `json:"methods,omitempty"`
}

// accessPolicy resolves an AccessPolicy's spec (defaults applied).
func accessPolicy(trustDomain, namespace, name string, spec meshv1alpha1.AccessPolicySpec) *AccessPolicy {
	ap := &AccessPolicy{Namespace: namespace, Name: name, Deny: spec.Action == meshv1alpha1.AccessDeny}
	for i, r := range spec.Rules {
		rule := AccessRule{Index: i}
		for _, f := range r.From {
			switch {
			case f.ServiceAccount != nil:
				rule.From = append(rule.From, Principal{ID: SPIFFEID(trustDomain, cmp.Or(f.ServiceAccount.Namespace, namespace), f.ServiceAccount.Name)})
			case f.Namespace != nil && *f.Namespace == "*":
				rule.From = append(rule.From, Principal{Authenticated: true})
			case f.Namespace != nil:
				rule.From = append(rule.From, Principal{IDPrefix: "spiffe://" + trustDomain + "/ns/" + *f.Namespace + "/sa/"})
			}
		}
		if len(r.From) > 0 && len(rule.From) == 0 {
			// Sources naming nothing (CEL rejects them) match no caller,
			// not every caller.
			continue
		}
		for _, op := range r.To {
			o := Operation{Ports: op.Ports, Methods: op.Methods}
			for _, p := range op.Paths {
				t := MatchPrefix
				if p.Type == meshv1alpha1.PathExact {
					t = MatchExact
				}
				o.Paths = append(o.Paths, PathMatch{Type: t, Value: p.Value})
			}
			rule.To = append(rule.To, o)
		}
		ap.Rules = append(ap.Rules, rule)
	}
	return ap
}
