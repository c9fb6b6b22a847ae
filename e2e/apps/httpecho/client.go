package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync"
	"time"
)

const (
	maxBody = 1 << 20 // read at most this much of a response
	maxRaw  = 512     // print at most this much of a body that is not JSON
)

type clientOptions struct {
	url, tcp, ws       string // the mode: exactly one is set
	count, concurrency int
	qps                float64
	duration, timeout  time.Duration
	method, host, body string
	header             http.Header
	h2c, newConn       bool
}

// runClient sends requests as its flags say and writes one JSON line per
// request to stdout. Failed requests are results, not errors: tests count
// them. Only bad flags make it fail.
func runClient(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseClientFlags(args, stderr)
	if err != nil {
		return err
	}
	var probe func(context.Context, int) any
	switch {
	case o.tcp != "":
		probe = o.probeTCP
	case o.ws != "":
		probe = o.probeWS
	default:
		p := newHTTPProber(o)
		defer p.client.CloseIdleConnections()
		probe = p.probe
	}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	var mu sync.Mutex // workers finish in any order; lines must not mix
	load(ctx, o, func(i int) {
		res := probe(ctx, i)
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(res)
	})
	return nil
}

func parseClientFlags(args []string, stderr io.Writer) (*clientOptions, error) {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &clientOptions{header: http.Header{}}
	fs.StringVar(&o.url, "url", "", "HTTP mode: the http:// or https:// URL to request")
	fs.StringVar(&o.tcp, "tcp", "", "TCP mode: host:port of a TCP echo port")
	fs.StringVar(&o.ws, "ws", "", "WebSocket mode: ws://host:port/ws")
	fs.IntVar(&o.count, "count", 1, "number of requests (ignored with --duration)")
	fs.IntVar(&o.concurrency, "concurrency", 1, "requests in flight at once")
	fs.Float64Var(&o.qps, "qps", 0, "requests started per second, across all workers; 0 as fast as possible")
	fs.DurationVar(&o.duration, "duration", 0, "send requests for this long instead of --count of them")
	fs.StringVar(&o.method, "method", http.MethodGet, "HTTP method")
	var headers headerFlag
	fs.Var(&headers, "header", "request header 'Name: value' (repeatable)")
	fs.StringVar(&o.host, "host", "", "Host header (default from the URL)")
	fs.StringVar(&o.body, "body", "", "request body")
	fs.BoolVar(&o.h2c, "h2c", false, "cleartext HTTP/2 with prior knowledge instead of HTTP/1.1")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Second, "per-request timeout")
	fs.BoolVar(&o.newConn, "new-conn", false, "a new TCP connection for every request (no keep-alive)")
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{errUsage}, args...)...)
	}

	for _, h := range headers {
		// Go sends req.Host, never a Host header field.
		if strings.EqualFold(h[0], "Host") {
			if o.host == "" {
				o.host = h[1]
			}
			continue
		}
		o.header.Add(h[0], h[1])
	}
	modes := 0
	for _, m := range []string{o.url, o.tcp, o.ws} {
		if m != "" {
			modes++
		}
	}
	switch {
	case modes != 1:
		return nil, bad("want exactly one of --url, --tcp and --ws")
	case o.duration < 0:
		return nil, bad("--duration must not be negative")
	case o.duration == 0 && o.count < 1:
		return nil, bad("--count must be at least 1")
	case o.concurrency < 1:
		return nil, bad("--concurrency must be at least 1")
	case !(o.qps >= 0): // also NaN
		return nil, bad("--qps must not be negative")
	case o.timeout <= 0:
		return nil, bad("--timeout must be positive")
	}
	switch {
	case o.url != "":
		u, err := url.Parse(o.url)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, bad("--url %q: want http://host[:port]/path or https://...", o.url)
		}
		if o.h2c && u.Scheme != "http" {
			return nil, bad("--h2c needs an http:// URL")
		}
		if _, err := http.NewRequest(o.method, o.url, nil); err != nil {
			return nil, bad("%v", err) // a bad method
		}
	case o.tcp != "":
		if _, _, err := net.SplitHostPort(o.tcp); err != nil {
			return nil, bad("--tcp %q: want host:port", o.tcp)
		}
	case o.ws != "":
		if u, err := url.Parse(o.ws); err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
			return nil, bad("--ws %q: want ws://host[:port]/path or wss://...", o.ws)
		}
	}
	return o, nil
}

// headerFlag collects repeated --header 'Name: value' flags.
type headerFlag [][2]string

func (h *headerFlag) String() string { return fmt.Sprint(*h) }

func (h *headerFlag) Set(v string) error {
	name, value, ok := strings.Cut(v, ":")
	name = strings.TrimSpace(name)
	if !ok || name == "" || strings.ContainsAny(name, " \t") {
		return fmt.Errorf("want 'Name: value', got %q", v)
	}
	*h = append(*h, [2]string{name, strings.TrimSpace(value)})
	return nil
}

// load calls probe with i = 0, 1, ... from o.concurrency workers, o.count
// times or for o.duration, starting o.qps calls a second in all if set.
// Calls in flight when the duration ends finish.
func load(ctx context.Context, o *clientOptions, probe func(i int)) {
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range o.concurrency {
		wg.Go(func() {
			for i := range jobs {
				probe(i)
			}
		})
	}
	dispatch(ctx, jobs, o.count, o.qps, o.duration)
	wg.Wait()
}

// dispatch hands out job numbers until ctx is done: count of them, or with a
// duration as many as start before it ends. With a rate, job i is due at
// start + i/qps, so that the rate holds on average however long each send
// waits for a free worker.
func dispatch(ctx context.Context, jobs chan<- int, count int, qps float64, duration time.Duration) {
	defer close(jobs)
	start := time.Now()
	end := start.Add(duration)
	if duration > 0 {
		count = 0 // unlimited
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, end)
		defer cancel()
	}
	for i := 0; count == 0 || i < count; i++ {
		if qps > 0 {
			due := start.Add(time.Duration(float64(i) / qps * float64(time.Second)))
			if duration > 0 && !due.Before(end) {
				return
			}
			t := time.NewTimer(time.Until(due))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		if ctx.Err() != nil { // select below picks at random if both are ready
			return
		}
		select {
		case jobs <- i:
		case <-ctx.Done():
			return
		}
	}
}

func msSince(start time.Time) float64 {
	return math.Round(float64(time.Since(start).Microseconds())/10) / 100
}

type httpResult struct {
	I           int               `json:"i"`
	Code        int               `json:"code"` // 0: no response
	Error       string            `json:"error"`
	MS          float64           `json:"ms"`
	Pod         string            `json:"pod"`
	Version     string            `json:"version"`
	Body        json.RawMessage   `json:"body,omitempty"` // a JSON object body
	Raw         string            `json:"raw,omitempty"`  // any other body, truncated
	RespHeaders map[string]string `json:"resp_headers"`
}

type httpProber struct {
	o      *clientOptions
	client *http.Client
}

func newHTTPProber(o *clientOptions) *httpProber {
	var protocols http.Protocols
	if o.h2c {
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP1(true)
		protocols.SetHTTP2(true) // only ever negotiated over TLS
	}
	tr := &http.Transport{
		// No Proxy: nothing may stand between the app and the network
		// but what captures its traffic.
		DialContext:         (&net.Dialer{}).DialContext,
		Protocols:           &protocols,
		DisableKeepAlives:   o.newConn,
		MaxIdleConnsPerHost: o.concurrency,
		TLSHandshakeTimeout: o.timeout,
		// No Accept-Encoding the test did not ask for, and bodies as sent.
		DisableCompression: true,
	}
	return &httpProber{o: o, client: &http.Client{
		Transport: tr,
		// Tests want to see redirects (say, from a route), not follow them.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

func (p *httpProber) probe(ctx context.Context, i int) any {
	res := httpResult{I: i, RespHeaders: map[string]string{}}
	ctx, cancel := context.WithTimeout(ctx, p.o.timeout)
	defer cancel()
	var body io.Reader
	if p.o.body != "" {
		body = strings.NewReader(p.o.body)
	}
	req, err := http.NewRequestWithContext(ctx, p.o.method, p.o.url, body)
	if err != nil { // checked with the flags
		res.Error = err.Error()
		return res
	}
	for k, v := range p.o.header {
		req.Header[k] = v
	}
	if p.o.host != "" {
		req.Host = p.o.host
	}
	start := time.Now()
	// Where a failed request spent its time (name lookup, connection,
	// waiting for the answer) goes into its error.
	var mu sync.Mutex
	var phases []string
	mark := func(what string) {
		mu.Lock()
		phases = append(phases, fmt.Sprintf("%s %.0f ms", what, msSince(start)))
		mu.Unlock()
	}
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		DNSDone:     func(httptrace.DNSDoneInfo) { mark("looked up") },
		ConnectDone: func(string, string, error) { mark("connected") },
		GotConn: func(i httptrace.GotConnInfo) {
			mark(map[bool]string{true: "reused a connection", false: "got a connection"}[i.Reused])
		},
		WroteRequest:         func(httptrace.WroteRequestInfo) { mark("wrote the request") },
		GotFirstResponseByte: func() { mark("first byte") },
	}))
	resp, err := p.client.Do(req)
	if err != nil {
		res.MS, res.Error = msSince(start), err.Error()
		mu.Lock()
		if len(phases) > 0 {
			res.Error += " (" + strings.Join(phases, ", ") + ")"
		}
		mu.Unlock()
		return res
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	res.MS, res.Code = msSince(start), resp.StatusCode
	if err != nil {
		res.Error = fmt.Sprintf("reading body: %v", err)
	}
	for k, v := range resp.Header {
		if len(v) > 0 {
			res.RespHeaders[strings.ToLower(k)] = v[0]
		}
	}
	if t := bytes.TrimSpace(data); len(t) > 0 && t[0] == '{' && json.Valid(t) {
		res.Body = t
		var id struct {
			Pod     string `json:"pod"`
			Version string `json:"version"`
		}
		_ = json.Unmarshal(t, &id) // fields of another type stay empty
		res.Pod, res.Version = id.Pod, id.Version
	} else {
		res.Raw = string(data[:min(len(data), maxRaw)])
	}
	if res.Pod == "" { // not an echo body, but maybe an echo server
		res.Pod = resp.Header.Get("X-Echo-Pod")
	}
	return res
}

type tcpResult struct {
	I     int     `json:"i"`
	Code  int     `json:"code"` // 1: hello and echo came back
	Error string  `json:"error"`
	MS    float64 `json:"ms"`
	Hello string  `json:"hello"`
	Echo  string  `json:"echo"`
}

func (o *clientOptions) probeTCP(ctx context.Context, i int) any {
	res := tcpResult{I: i}
	start := time.Now()
	err := o.tcpOnce(ctx, &res)
	res.MS = msSince(start)
	if err != nil {
		res.Error = err.Error()
	} else {
		res.Code = 1
	}
	return res
}

// tcpOnce reads the greeting, then sends a line and reads it back.
func (o *clientOptions) tcpOnce(ctx context.Context, res *tcpResult) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", o.tcp)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	res.Hello = strings.TrimSuffix(line, "\n")
	if err != nil {
		return fmt.Errorf("reading hello: %w", err)
	}
	if _, err := io.WriteString(conn, "ping\n"); err != nil {
		return fmt.Errorf("sending ping: %w", err)
	}
	line, err = r.ReadString('\n')
	res.Echo = strings.TrimSuffix(line, "\n")
	if err != nil {
		return fmt.Errorf("reading echo: %w", err)
	}
	if res.Echo != "ping" {
		return fmt.Errorf("echo %q, want %q", res.Echo, "ping")
	}
	return nil
}

type wsResult struct {
	I     int     `json:"i"`
	Code  int     `json:"code"` // 101: upgraded and echoed
	Error string  `json:"error"`
	MS    float64 `json:"ms"`
	Reply string  `json:"reply"`
}

func (o *clientOptions) probeWS(ctx context.Context, i int) any {
	res := wsResult{I: i}
	start := time.Now()
	reply, err := o.wsOnce(ctx)
	res.MS, res.Reply = msSince(start), reply
	if err != nil {
		res.Error = err.Error()
	} else {
		res.Code = http.StatusSwitchingProtocols
	}
	return res
}

func (o *clientOptions) wsOnce(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	c, err := wsDial(ctx, o.ws, o.host, o.header)
	if err != nil {
		return "", err
	}
	defer c.close()
	if err := c.send(opText, []byte("ping")); err != nil {
		return "", fmt.Errorf("sending: %w", err)
	}
	_, msg, err := c.receive()
	if err != nil {
		return "", fmt.Errorf("receiving: %w", err)
	}
	return string(msg), nil
}
