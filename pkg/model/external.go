package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"k8s.io/utils/ptr"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// ExternalService is an ExternalService, parsed.
type ExternalService struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Hosts are DNS names the sidecar resolves.
	Hosts []string `json:"hosts"`
	// Addresses are the masked CIDRs of TCP ports (one that does not parse
	// is left out and reported).
	Addresses []netip.Prefix `json:"addresses,omitempty"`
	Ports     []ExternalPort `json:"ports"`
}

// ExternalProtocol is how an external port is matched.
type ExternalProtocol string

const (
	// ExternalHTTP: plaintext HTTP, matched by Host header.
	ExternalHTTP ExternalProtocol = "HTTP"
	// ExternalTLS: TLS the application originates, matched by SNI.
	ExternalTLS ExternalProtocol = "TLS"
	// ExternalTCP: opaque TCP, matched by destination address.
	ExternalTCP ExternalProtocol = "TCP"
)

// ExternalPort is one port of an ExternalService.
type ExternalPort struct {
	Number   int32            `json:"number"`
	Protocol ExternalProtocol `json:"protocol"`
	// TargetPort on the host (Number unless set).
	TargetPort int32 `json:"targetPort"`
	// TLS, when set, makes the sidecar originate TLS to the host.
	TLS *TLSOrigination `json:"tls,omitempty"`
}

// TLSOrigination is TLS from the sidecar to an external host.
type TLSOrigination struct {
	// SNI sent ("": the host's name).
	SNI string `json:"sni,omitempty"`
}

func (m *Mesh) addExternal(ess []*meshv1alpha1.ExternalService) []Problem {
	var problems []Problem
	for _, es := range ess {
		out := &ExternalService{Namespace: es.Namespace, Name: es.Name, Hosts: es.Spec.Hosts}
		for i, a := range es.Spec.Addresses {
			p, err := netip.ParsePrefix(a)
			if err != nil {
				problems = append(problems, Problem{Object: Ref{Kind: "ExternalService", Namespace: es.Namespace, Name: es.Name}, Field: fmt.Sprintf("spec.addresses[%d]", i),
					Reason: ReasonUnsupportedValue, Condition: meshv1alpha1.ConditionAccepted,
					Message: fmt.Sprintf("address %q is not a CIDR such as 203.0.113.0/24: it is ignored", a)})
				continue
			}
			out.Addresses = append(out.Addresses, p.Masked())
		}
		for _, p := range es.Spec.Ports {
			ep := ExternalPort{Number: p.Number, Protocol: ExternalProtocol(p.Protocol), TargetPort: ptr.Deref(p.TargetPort, p.Number)}
			if p.TLS != nil {
				ep.TLS = &TLSOrigination{SNI: p.TLS.SNI}
			}
			out.Ports = append(out.Ports, ep)
		}
		m.External = append(m.External, out)
	}
	slices.SortFunc(m.External, func(a, b *ExternalService) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return problems
}
