package model

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// LastGood keeps, for every route and BackendPolicy, the last generation
// that built without a problem that breaks its traffic, and builds the mesh
// with that generation in force while a newer one is invalid: a typo in an
// edit then costs a status condition, not the Service's traffic.
//
// Only an edit of the object itself is held back. A change of the world
// around it (a backend Service deleted, a ReferenceGrant revoked) applies
// as Build says, since the old generation would be wrong as well; and a
// last good generation that no longer builds cleanly is not used either.
// The record is in memory: a restarted controller programs what the
// apiserver holds. A LastGood is safe for concurrent use; the zero value is
// ready.
type LastGood struct {
	mu   sync.Mutex
	kept map[Ref]keptObject
}

type keptObject struct {
	uid        types.UID
	generation int64
	http       *gwv1.HTTPRoute
	grpc       *gwv1.GRPCRoute
	backend    *meshv1alpha1.BackendPolicy
}

// BreaksTraffic says whether a problem makes the object's configuration
// lose requests it would otherwise serve: an unprogrammable route, a rule
// answering HTTP 500, a parent or target that does not exist. A conflict (the
// object lost to an older one) and a setting that is only ignored do not.
func (p Problem) BreaksTraffic() bool {
	switch p.Object.Kind {
	case "HTTPRoute", "GRPCRoute", "BackendPolicy":
	default:
		return false
	}
	if p.Condition != meshv1alpha1.ConditionAccepted && p.Condition != meshv1alpha1.ConditionResolvedRefs {
		return false
	}
	if p.Reason == meshv1alpha1.ReasonConflicted || strings.HasSuffix(p.Field, ".sessionPersistence") {
		return false
	}
	return true
}

// Build is model.Build with each invalid new generation of a route or
// BackendPolicy replaced by its last good one, where there is one. The
// replaced object's problems are those of its new generation, each saying
// which generation stays programmed.
func (l *LastGood) Build(in Input) (*Mesh, []Problem) {
	l.mu.Lock()
	defer l.mu.Unlock()
	m, problems := Build(in)
	broken := brokenObjects(problems)
	held := map[Ref]keptObject{}
	for _, o := range objectsOf(in) {
		k, ok := l.kept[o.ref]
		if broken[o.ref] && ok && k.uid == o.uid && k.generation < o.generation {
			held[o.ref] = k
		}
	}
	final := problems
	// The last good generations must still build cleanly; drop those
	// that do not and build again (at most once per held object).
	for len(held) > 0 {
		m2, ps2 := Build(substitute(in, held))
		still := brokenObjects(ps2)
		n := len(held)
		for ref := range held {
			if still[ref] {
				delete(held, ref)
			}
		}
		if len(held) == n {
			m, final = m2, ps2
			break
		}
		// Some fell back: build again with the rest (with none, the
		// first build stands).
	}
	if len(held) > 0 {
		out := final[:0:0]
		for _, p := range final {
			if _, ok := held[p.Object]; !ok {
				out = append(out, p)
			}
		}
		for _, p := range problems {
			if k, ok := held[p.Object]; ok {
				p.Message += fmt.Sprintf("; generation %d, the last valid one, stays programmed until this is fixed", k.generation)
				out = append(out, p)
			}
		}
		final = out
	}
	l.remember(in, broken)
	return m, final
}

// remember records the generations that built cleanly and forgets objects
// that are gone.
func (l *LastGood) remember(in Input, broken map[Ref]bool) {
	next := make(map[Ref]keptObject, len(l.kept))
	for _, o := range objectsOf(in) {
		if !broken[o.ref] {
			next[o.ref] = o.keptObject
		} else if k, ok := l.kept[o.ref]; ok && k.uid == o.uid {
			next[o.ref] = k
		}
	}
	l.kept = next
}

type inputObject struct {
	ref Ref
	keptObject
}

func objectsOf(in Input) []inputObject {
	var out []inputObject
	for _, r := range in.HTTPRoutes {
		out = append(out, inputObject{Ref{Kind: "HTTPRoute", Namespace: r.Namespace, Name: r.Name}, keptObject{uid: r.UID, generation: r.Generation, http: r}})
	}
	for _, r := range in.GRPCRoutes {
		out = append(out, inputObject{Ref{Kind: "GRPCRoute", Namespace: r.Namespace, Name: r.Name}, keptObject{uid: r.UID, generation: r.Generation, grpc: r}})
	}
	for _, p := range in.BackendPolicies {
		out = append(out, inputObject{Ref{Kind: "BackendPolicy", Namespace: p.Namespace, Name: p.Name}, keptObject{uid: p.UID, generation: p.Generation, backend: p}})
	}
	return out
}

func brokenObjects(problems []Problem) map[Ref]bool {
	out := map[Ref]bool{}
	for _, p := range problems {
		if p.BreaksTraffic() {
			out[p.Object] = true
		}
	}
	return out
}

// substitute returns in with the held objects' last good generations in
// place of their current ones. The status the controller writes still
// names the current generation (it reads the objects, not this input).
func substitute(in Input, held map[Ref]keptObject) Input {
	swap := func(kind, ns, name string) (keptObject, bool) {
		k, ok := held[Ref{Kind: kind, Namespace: ns, Name: name}]
		return k, ok
	}
	in.HTTPRoutes = slices.Clone(in.HTTPRoutes)
	for i, r := range in.HTTPRoutes {
		if k, ok := swap("HTTPRoute", r.Namespace, r.Name); ok {
			in.HTTPRoutes[i] = k.http
		}
	}
	in.GRPCRoutes = slices.Clone(in.GRPCRoutes)
	for i, r := range in.GRPCRoutes {
		if k, ok := swap("GRPCRoute", r.Namespace, r.Name); ok {
			in.GRPCRoutes[i] = k.grpc
		}
	}
	in.BackendPolicies = slices.Clone(in.BackendPolicies)
	for i, p := range in.BackendPolicies {
		if k, ok := swap("BackendPolicy", p.Namespace, p.Name); ok {
			in.BackendPolicies[i] = k.backend
		}
	}
	return in
}
