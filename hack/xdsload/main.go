// Command xdsload connects many simulated proxies (internal/xdsclient) to
// an xDS server, so the push benchmark measures the controller's memory
// without the clients in the same process. It reads a JSON plan on stdin's
// first line, prints READY when every proxy holds the watched cluster's
// endpoints, then answers "WAIT <endpoints> <start-unix-nanos>" lines with
// "LAT <ms>,<ms>,..." (each proxy's delay until it held that many
// endpoints) and "STATS <responses> <bytes>".
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/trellis-mesh/trellis/internal/xdsclient"
)

// Plan is what to connect.
type Plan struct {
	Addr    string  `json:"addr"`
	CAPEM   string  `json:"caPEM"`
	Cluster string  `json:"cluster"`
	Proxies []Proxy `json:"proxies"`
}

// Proxy is one simulated proxy.
type Proxy struct {
	Node  string `json:"node"`
	Token string `json:"token"`
	IP    string `json:"ip"`
	Delta bool   `json:"delta"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "xdsload:", err)
		os.Exit(1)
	}
}

func endpoints(cluster string, n int) func(map[string]map[string]proto.Message, map[string]int) bool {
	return func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		cla, ok := res[resource.EndpointType][cluster].(*endpointv3.ClusterLoadAssignment)
		if !ok {
			return false
		}
		c := 0
		for _, l := range cla.Endpoints {
			c += len(l.LbEndpoints)
		}
		return c == n
	}
}

func run() error {
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadString('\n')
	if err != nil {
		return err
	}
	var plan Plan
	if err := json.Unmarshal([]byte(line), &plan); err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(plan.CAPEM))
	clients := make([]*xdsclient.Client, len(plan.Proxies))
	var wg sync.WaitGroup
	errs := make(chan error, len(plan.Proxies))
	sem := make(chan struct{}, 64)
	for i, p := range plan.Proxies {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			conn, err := xdsclient.Dial(plan.Addr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, p.Token, p.IP)
			if err != nil {
				errs <- err
				return
			}
			c, err := xdsclient.Start(context.Background(), conn, p.Node, p.Delta)
			if err != nil {
				errs <- err
				return
			}
			clients[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, c := range clients {
		if err := c.WaitFor(ctx, endpoints(plan.Cluster, 1)); err != nil {
			return err
		}
	}
	fmt.Println("READY")
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			return nil
		}
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "WAIT" {
			return fmt.Errorf("bad command %q", line)
		}
		n, _ := strconv.Atoi(f[1])
		startNs, _ := strconv.ParseInt(f[2], 10, 64)
		start := time.Unix(0, startNs)
		lat := make([]time.Duration, len(clients))
		var wg sync.WaitGroup
		for i, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.WaitFor(ctx, endpoints(plan.Cluster, n)); err != nil {
					fmt.Fprintln(os.Stderr, "xdsload:", err)
				}
				lat[i] = time.Since(start)
			}()
		}
		wg.Wait()
		slices.Sort(lat)
		ms := make([]string, len(lat))
		for i, l := range lat {
			ms[i] = strconv.FormatFloat(float64(l.Microseconds())/1000, 'f', 1, 64)
		}
		responses, bytes := 0, 0
		for _, c := range clients {
			_, r := c.Snapshot()
			for _, v := range r {
				responses += v
			}
			bytes += c.Bytes()
		}
		fmt.Println("LAT " + strings.Join(ms, ","))
		fmt.Printf("STATS %d %d\n", responses, bytes)
	}
}
