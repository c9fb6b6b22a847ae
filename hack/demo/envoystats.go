package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// sample is what the frontend's sidecar reports for the reviews clusters.
type sample struct {
	byVersion map[string]float64 // 2xx answers per version (v1, v2)
	total     float64            // answers of any class
	ok        float64            // 2xx
	buckets   map[float64]float64
}

// scrape reads the sidecar's merged stats as a Prometheus server would.
func scrape(ctx context.Context, podIP string) (*sample, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(podIP, "15020")+"/stats/prometheus", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	s := &sample{byVersion: map[string]float64{}, buckets: map[float64]float64{}}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		name, labels, value, ok := parseSeries(sc.Text())
		if !ok {
			continue
		}
		cluster := labels["envoy_cluster_name"]
		version := ""
		switch {
		case strings.Contains(cluster, "||reviews-v1."):
			version = "v1"
		case strings.Contains(cluster, "||reviews-v2."):
			version = "v2"
		default:
			continue
		}
		switch name {
		case "envoy_cluster_upstream_rq_xx":
			s.total += value
			if labels["envoy_response_code_class"] == "2" {
				s.ok += value
				s.byVersion[version] += value
			}
		case "envoy_cluster_upstream_rq_time_bucket":
			le := math.Inf(1)
			if labels["le"] != "+Inf" {
				le, _ = strconv.ParseFloat(labels["le"], 64)
			}
			s.buckets[le] += value
		}
	}
	return s, sc.Err()
}

// parseSeries splits `name{a="b",c="d"} value`.
func parseSeries(line string) (string, map[string]string, float64, bool) {
	if line == "" || line[0] == '#' {
		return "", nil, 0, false
	}
	i := strings.IndexByte(line, '{')
	j := strings.LastIndexByte(line, '}')
	if i < 0 || j < i {
		return "", nil, 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(line[j+1:]), 64)
	if err != nil {
		return "", nil, 0, false
	}
	labels := map[string]string{}
	for _, kv := range strings.Split(line[i+1:j], `",`) {
		k, val, ok := strings.Cut(kv, `="`)
		if ok {
			labels[k] = strings.TrimSuffix(val, `"`)
		}
	}
	return line[:i], labels, v, true
}

// quantile of the latency histogram delta (cumulative buckets, ms),
// interpolated within the bucket that holds it; ok is false when the
// histogram did not move (Envoy refreshes histograms every stats flush, 5 s).
func quantile(cur, prev map[float64]float64, q float64) (float64, bool) {
	les := slices.Sorted(func(yield func(float64) bool) {
		for le := range cur {
			if !yield(le) {
				return
			}
		}
	})
	if len(les) == 0 {
		return 0, false
	}
	total := cur[les[len(les)-1]] - prev[les[len(les)-1]]
	if total <= 0 {
		return 0, false
	}
	lower, below := 0.0, 0.0
	for _, le := range les {
		n := cur[le] - prev[le]
		if n >= q*total {
			if math.IsInf(le, 1) {
				return lower, true
			}
			return lower + (le-lower)*(q*total-below)/max(n-below, 1), true
		}
		lower, below = le, n
	}
	return lower, true
}

// envoyTable prints one line per second from the frontend sidecar's stats;
// the caller's identity is what the reviews app saw (its sidecar's XFCC,
// echoed into the frontend's log).
func envoyTable(ctx context.Context, podIP, frontendLog string, d time.Duration) error {
	// Start once reviews answers (the frontend calls from its first second,
	// before reviews may have ready endpoints).
	var prev *sample
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		var err error
		if prev, err = scrape(ctx, podIP); err == nil && prev.ok > 0 {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("no answer from reviews in the frontend sidecar's stats after a minute: %v", err)
		}
	}
	hist := prev.buckets
	lat50, lat99 := "-", "-" // until the first histogram refresh
	printTable(ctx, d, func() (row, error) {
		cur, err := scrape(ctx, podIP)
		if err != nil {
			return row{}, fmt.Errorf("scrape: %w", err)
		}
		// Latency over the last histogram refresh, kept until the next one.
		if q50, ok := quantile(cur.buckets, hist, 0.5); ok {
			q99, _ := quantile(cur.buckets, hist, 0.99)
			lat50, lat99 = fmt.Sprintf("%.2f", q50), fmt.Sprintf("%.2f", q99)
			hist = cur.buckets
		}
		r := row{
			requests: cur.total - prev.total, ok: cur.ok - prev.ok,
			v1: cur.byVersion["v1"] - prev.byVersion["v1"], v2: cur.byVersion["v2"] - prev.byVersion["v2"],
			p50: lat50, p99: lat99, caller: callerIdentity(frontendLog),
		}
		prev = cur
		return r, nil
	})
	return nil
}

// callerIdentity is the URI in the x-forwarded-client-cert the reviews app
// received on the frontend's latest call.
func callerIdentity(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "-"
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > 16<<10 {
		_, _ = f.Seek(-16<<10, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		var r struct {
			Body struct {
				Headers map[string][]string `json:"headers"`
			} `json:"body"`
		}
		if json.Unmarshal([]byte(lines[i]), &r) != nil {
			continue
		}
		for _, xfcc := range r.Body.Headers["x-forwarded-client-cert"] {
			for _, part := range strings.Split(xfcc, ";") {
				if uri, ok := strings.CutPrefix(part, "URI="); ok {
					return uri
				}
			}
		}
	}
	return "-"
}
