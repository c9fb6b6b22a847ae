package framework

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// ClusterDomain is the DNS suffix of Services, as in a default cluster.
const ClusterDomain = "cluster.local"

// dnsServer plays the cluster DNS (CoreDNS's kubernetes plugin, A records
// only): <service>.<namespace>.svc.cluster.local answers the Service's
// cluster IP, or its ready endpoints' addresses when headless. Names added
// with add (test hosts outside the mesh) answer their address. Everything
// else is NXDOMAIN. Pods reach it at the bridge address through the
// resolv.conf the kubelet gives them (ip netns exec bind-mounts
// /etc/netns/<ns>/resolv.conf over /etc/resolv.conf).
type dnsServer struct {
	client client.Client
	conn   net.PacketConn
	mu     sync.Mutex
	static map[string]netip.Addr
}

func startDNS(c client.Client, addr string) (*dnsServer, error) {
	conn, err := net.ListenPacket("udp4", addr)
	if err != nil {
		return nil, err
	}
	d := &dnsServer{client: c, conn: conn, static: map[string]netip.Addr{}}
	go d.serve()
	return d, nil
}

func (d *dnsServer) close() { d.conn.Close() }

func (d *dnsServer) add(name string, a netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.static[strings.TrimSuffix(strings.ToLower(name), ".")] = a
}

func (d *dnsServer) serve() {
	for {
		buf := make([]byte, 1500)
		n, from, err := d.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		// Each query on its own: one slow apiserver read must not hold up
		// the others (a resolver waits 5 s before it asks again).
		go func() {
			if resp, ok := d.answer(buf[:n]); ok {
				_, _ = d.conn.WriteTo(resp, from)
			}
		}()
	}
}

func (d *dnsServer) answer(req []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil, false
	}
	q, err := p.Question()
	if err != nil {
		return nil, false
	}
	resp := dnsmessage.Message{Header: dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}, Questions: []dnsmessage.Question{q}}
	addrs, found := d.lookup(strings.TrimSuffix(strings.ToLower(q.Name.String()), "."))
	switch {
	case !found:
		resp.RCode = dnsmessage.RCodeNameError
	case q.Type == dnsmessage.TypeA:
		for _, a := range addrs {
			resp.Answers = append(resp.Answers, dnsmessage.Resource{
				Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 5},
				Body:   &dnsmessage.AResource{A: a.As4()},
			})
		}
	}
	out, err := resp.Pack()
	return out, err == nil
}

// lookup resolves a fully qualified name; found is false for NXDOMAIN.
func (d *dnsServer) lookup(name string) (addrs []netip.Addr, found bool) {
	d.mu.Lock()
	a, ok := d.static[name]
	d.mu.Unlock()
	if ok {
		return []netip.Addr{a}, true
	}
	rest, ok := strings.CutSuffix(name, ".svc."+ClusterDomain)
	if !ok {
		return nil, false
	}
	svcName, ns, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(ns, ".") {
		return nil, false
	}
	ctx := context.Background()
	var svc corev1.Service
	if err := d.client.Get(ctx, client.ObjectKey{Namespace: ns, Name: svcName}, &svc); err != nil {
		return nil, false
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil && a.Is4() {
			return []netip.Addr{a}, true
		}
		return nil, true
	}
	var pods corev1.PodList
	if err := d.client.List(ctx, &pods, client.InNamespace(ns), client.MatchingLabels(svc.Spec.Selector)); err != nil {
		return nil, true
	}
	for _, p := range pods.Items {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil && a.Is4() && p.DeletionTimestamp == nil {
			addrs = append(addrs, a)
		}
	}
	return addrs, true
}

// resolvConf is a pod's /etc/resolv.conf, with the search path of a pod in
// namespace ns (ndots 5, as the kubelet writes it).
func resolvConf(ns string) string {
	return "nameserver " + GatewayIP + "\nsearch " + ns + ".svc." + ClusterDomain + " svc." + ClusterDomain + " " + ClusterDomain + "\noptions ndots:5\n"
}
