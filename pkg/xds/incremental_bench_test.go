package xds

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/clock"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// endpointChangeSetup is a mesh of services Services with 10 endpoints
// each and classes client pods, each its own ServiceAccount (so its own
// class), all seeing every Service; and a second model that differs from
// it by one endpoint of one Service.
func endpointChangeSetup(tb testing.TB, services, classes int, full bool) (p *Pusher, a, b *model.Mesh) {
	tb.Helper()
	var in model.Input
	for i := range services {
		ns := fmt.Sprintf("ns-%d", i%10)
		name := fmt.Sprintf("svc-%d", i)
		in.Services = append(in.Services, testgen.Service(ns, name, fmt.Sprintf("10.96.%d.%d", i/250, i%250+1), testgen.Port("http", 80, 8080)))
		var eps []testgen.Endpoint
		for e := range 10 {
			eps = append(eps, testgen.Endpoint{IP: fmt.Sprintf("10.%d.%d.%d", 100+e, i/250, i%250+1)})
		}
		in.EndpointSlices = append(in.EndpointSlices, testgen.EndpointSlice(ns, name, name+"-1", "http", 8080, eps...))
	}
	for i := range classes {
		in.Pods = append(in.Pods, testgen.Pod(fmt.Sprintf("ns-%d", i%10), fmt.Sprintf("client-%d", i),
			testgen.WithServiceAccount(fmt.Sprintf("client-%d", i)), testgen.WithIP(fmt.Sprintf("10.200.%d.%d", i/250, i%250+1))))
	}
	a, _ = model.Build(in)
	changed := in.EndpointSlices[0].DeepCopy()
	changed.Endpoints = changed.Endpoints[1:]
	in.EndpointSlices = append([]*discoveryv1.EndpointSlice{changed}, in.EndpointSlices[1:]...)
	b, _ = model.Build(in)

	p = NewPusher(NewCache(), NewMetrics(), logr.Discard(), clock.RealClock{})
	p.fullRoundsOnly = full
	p.Update(a)
	for _, pod := range in.Pods {
		p.Connect(&Identity{NodeID: NodeID{Type: "sidecar", IP: pod.Status.PodIP, Pod: pod.Name, Namespace: pod.Namespace}, ServiceAccount: pod.Spec.ServiceAccountName})
	}
	p.round(context.Background())
	return p, a, b
}

// heapInUse is the Go heap in use after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEndpointChange measures a push round after an endpoint change
// of one Service every class sees: the controller's CPU per change
// (translation, validation, marshalling, cache update; not the sending,
// which BenchmarkPush measures), with the endpoint-only path and with full
// translation of every class.
func BenchmarkEndpointChange(b *testing.B) {
	for _, size := range []struct{ services, classes int }{{1000, 100}, {1000, 1000}} {
		for _, full := range []bool{false, true} {
			if full && size.classes > 100 {
				continue // minutes per round: the 100-class figure shows the scale
			}
			path := map[bool]string{false: "endpoints-only", true: "full"}[full]
			b.Run(fmt.Sprintf("services=%d/classes=%d/%s", size.services, size.classes, path), func(b *testing.B) {
				heap0 := heapInUse()
				p, m1, m2 := endpointChangeSetup(b, size.services, size.classes, full)
				setupHeap := float64(heapInUse()-heap0) / (1 << 20)
				// TRELLIS_CPU_PROFILE=file profiles the changes (not the setup).
				if path := os.Getenv("TRELLIS_CPU_PROFILE"); path != "" {
					if f, err := os.Create(path); err == nil {
						_ = pprof.StartCPUProfile(f)
						defer func() { pprof.StopCPUProfile(); f.Close() }()
					}
				}
				cpu0 := cpuTime()
				n := 0
				for b.Loop() {
					m := m1
					if n%2 == 0 {
						m = m2
					}
					p.Update(m)
					p.round(context.Background())
					n++
				}
				b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Millisecond)/float64(n), "cpu-ms/change")
				b.ReportMetric(setupHeap, "MB-heap-after-setup")
			})
		}
	}
}

// TestEndpointChangeBenchTwin is the small twin of BenchmarkEndpointChange:
// its setup holds, and a change takes the endpoint-only path.
func TestEndpointChangeBenchTwin(t *testing.T) {
	p, _, m2 := endpointChangeSetup(t, 3, 2, false)
	p.Update(m2)
	p.round(context.Background())
	if got := testutil.ToFloat64(p.Metrics.ClassUpdates.WithLabelValues("endpoints")); got != 2 {
		t.Errorf("%v classes updated in place; want both", got)
	}
	for _, key := range p.Cache.ClassKeys() {
		c := p.Cache.classes[key] // no round runs meanwhile
		if len(c[resource.EndpointType]) != 3 {
			t.Errorf("class %s holds %d ClusterLoadAssignments; want 3", key, len(c[resource.EndpointType]))
		}
	}
}
