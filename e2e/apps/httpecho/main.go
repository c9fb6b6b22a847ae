// Command httpecho is the e2e workload for sidecar mode: an HTTP, TCP and
// WebSocket echo server that reports which pod answered and what reached it,
// and a client that tests run inside pods and whose JSON lines they parse.
//
// It knows nothing of the mesh: plain sockets, plain HTTP, no proxy settings.
// Whatever the tests observe (routing, retries, mTLS, policy) is therefore
// the work of the Envoy sidecars that capture its traffic.
//
//	httpecho serve  [--http-port 8080] [--tcp-port N] [--tls-port N ...]
//	httpecho client --url URL | --tcp HOST:PORT | --ws ws://HOST:PORT/ws [...]
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// shutdownGrace is how long in-flight requests and connections may go on
// after SIGTERM.
const shutdownGrace = 5 * time.Second

// errUsage marks bad command lines: they exit 2, unlike failures at run time.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd := ""
	if len(args) > 0 {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, os.Stderr)
	case "client":
		err = runClient(ctx, args, os.Stdout, os.Stderr)
	case "relay":
		err = relay(ctx, args, os.Stderr)
	case "":
		err = fmt.Errorf("%w: no command", errUsage)
	default:
		err = fmt.Errorf("%w: unknown command %q", errUsage, cmd)
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "httpecho:", err)
		fmt.Fprintln(os.Stderr, "usage: httpecho serve|client|relay [flags]  (-h for flags)")
		return 2
	default:
		fmt.Fprintln(os.Stderr, "httpecho:", err)
		return 1
	}
}

// parseFlags parses args and rejects positional arguments, so that a typo
// such as "--count 3 4" is not silently ignored.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	return nil
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	httpPort := fs.Int("http-port", 8080, "HTTP/1.1 and cleartext HTTP/2 (prior knowledge) port; 0 disables")
	extraPorts := fs.String("extra-http-ports", "", "comma-separated more ports with the same HTTP handler")
	tcpPort := fs.Int("tcp-port", 0, "TCP echo port; 0 disables")
	tlsPort := fs.Int("tls-port", 0, "HTTPS port (HTTP/1.1 and h2); 0 disables; needs --tls-cert and --tls-key")
	tlsCert := fs.String("tls-cert", "", "PEM certificate chain file for --tls-port")
	tlsKey := fs.String("tls-key", "", "PEM private key file for --tls-port")
	var cfg config
	fs.StringVar(&cfg.pod, "pod", defaultPod(), "pod name reported in responses; defaults to $POD_NAME, else the hostname")
	fs.StringVar(&cfg.version, "version", envOr("VERSION", "v1"), "version reported in responses; defaults to $VERSION, else v1")
	fs.Int64Var(&cfg.failEvery, "fail-every", 0, "answer every n-th echo request with 503; 0 never")
	fs.DurationVar(&cfg.delay, "delay", 0, "wait this long before answering each echo request")
	fs.DurationVar(&cfg.unhealthyAfter, "unhealthy-after", 0, "/healthz answers 500 once this long has passed since start; 0 never")
	if err := parseFlags(fs, args); err != nil {
		return err
	}

	ports, err := parsePorts(*extraPorts)
	if err != nil {
		return err
	}
	if *httpPort != 0 {
		ports = append([]int{*httpPort}, ports...)
	}
	for _, p := range append(ports, *tcpPort, *tlsPort) {
		if p < 0 || p > 65535 {
			return fmt.Errorf("%w: port %d out of range", errUsage, p)
		}
	}
	switch {
	case cfg.failEvery < 0:
		return fmt.Errorf("%w: --fail-every must not be negative", errUsage)
	case cfg.delay < 0 || cfg.unhealthyAfter < 0:
		return fmt.Errorf("%w: durations must not be negative", errUsage)
	case *tlsPort != 0 && (*tlsCert == "" || *tlsKey == ""):
		return fmt.Errorf("%w: --tls-port needs --tls-cert and --tls-key", errUsage)
	case len(ports) == 0 && *tcpPort == 0 && *tlsPort == 0:
		return fmt.Errorf("%w: every port is disabled", errUsage)
	}

	var ls listeners
	ok := false
	defer func() {
		if !ok {
			ls.close()
		}
	}()
	for _, p := range ports {
		l, err := listen(p)
		if err != nil {
			return err
		}
		ls.http = append(ls.http, l)
	}
	if *tcpPort != 0 {
		if ls.tcp, err = listen(*tcpPort); err != nil {
			return err
		}
	}
	if *tlsPort != 0 {
		if ls.cert, err = tls.LoadX509KeyPair(*tlsCert, *tlsKey); err != nil {
			return fmt.Errorf("loading TLS key pair: %w", err)
		}
		if ls.tls, err = listen(*tlsPort); err != nil {
			return err
		}
	}
	ok = true
	for _, l := range ls.http {
		fmt.Fprintf(stderr, "listening http %s\n", l.Addr())
	}
	if ls.tls != nil {
		fmt.Fprintf(stderr, "listening https %s\n", ls.tls.Addr())
	}
	if ls.tcp != nil {
		fmt.Fprintf(stderr, "listening tcp %s\n", ls.tcp.Addr())
	}
	return newServer(cfg, os.Stdout).run(ctx, ls)
}

func parsePorts(list string) ([]int, error) {
	var ports []int
	for f := range strings.SplitSeq(list, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p <= 0 {
			return nil, fmt.Errorf("%w: bad port %q in --extra-http-ports", errUsage, f)
		}
		ports = append(ports, p)
	}
	return ports, nil
}

// listen listens on every address of the pod: sidecars may connect to the
// app on the pod IP or on localhost, depending on how inbound is set up.
func listen(port int) (net.Listener, error) {
	l, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("listening: %w", err)
	}
	return l, nil
}

func defaultPod() string {
	if p := os.Getenv("POD_NAME"); p != "" {
		return p
	}
	if h, err := os.Hostname(); err == nil {
		return h
	}
	return "unknown"
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

type config struct {
	pod, version   string
	failEvery      int64
	delay          time.Duration
	unhealthyAfter time.Duration
}

// listeners are what a server answers on; nil ones are off.
type listeners struct {
	http []net.Listener // HTTP/1.1 and h2c
	tls  net.Listener   // HTTPS with cert
	cert tls.Certificate
	tcp  net.Listener // TCP echo
}

func (ls listeners) close() {
	for _, l := range append(ls.http, ls.tls, ls.tcp) {
		if l != nil {
			l.Close()
		}
	}
}

type server struct {
	config
	start time.Time
	count atomic.Int64 // echo requests so far, for --fail-every and "count"
	conns connSet      // connections net/http does not track

	logMu sync.Mutex
	log   io.Writer
}

func newServer(cfg config, log io.Writer) *server {
	return &server{config: cfg, start: time.Now(), log: log}
}

// logf writes one line, prefixed with the time; lines from concurrent
// requests must not interleave.
func (s *server) logf(format string, args ...any) {
	line := time.Now().Format(time.RFC3339) + " " + fmt.Sprintf(format, args...) + "\n"
	s.logMu.Lock()
	defer s.logMu.Unlock()
	_, _ = io.WriteString(s.log, line)
}

// run serves ls until ctx is done or a listener fails, then shuts down
// gracefully. It closes the listeners.
func (s *server) run(ctx context.Context, ls listeners) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // h2c with prior knowledge, on the same port
	protocols.SetHTTP2(true)            // h2 over TLS, negotiated by ALPN
	srv := &http.Server{
		Handler:   s,
		Protocols: &protocols,
		// No IdleTimeout: sidecars pool connections and manage their
		// lifetime; an app closing them would cause spurious resets.
		ReadHeaderTimeout: 10 * time.Second,
	}
	if ls.tls != nil {
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{ls.cert}}
	}
	errs := make(chan error, len(ls.http)+2)
	for _, l := range ls.http {
		go func() { errs <- srv.Serve(l) }()
	}
	if ls.tls != nil {
		go func() { errs <- srv.ServeTLS(ls.tls, "", "") }()
	}
	if ls.tcp != nil {
		go func() { errs <- s.serveTCP(ls.tcp) }()
	}

	var err error
	select {
	case <-ctx.Done():
	case err = <-errs:
		err = fmt.Errorf("serving: %w", err)
	}
	s.shutdown(srv, ls.tcp)
	return err
}

// shutdown stops accepting, lets requests and connections finish for up to
// shutdownGrace, then closes what is left.
func (s *server) shutdown(srv *http.Server, tcp net.Listener) {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if tcp != nil {
		tcp.Close()
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if srv.Shutdown(ctx) != nil {
			srv.Close() // the grace period is over
		}
	})
	wg.Go(func() { s.conns.drain(ctx) })
	wg.Wait()
}

// ServeHTTP logs every request and routes it. There is no ServeMux: it would
// clean or redirect some paths, and the echo must show paths as they came.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := &recorder{ResponseWriter: w}
	logOnce := sync.OnceFunc(func() { s.logf("%s %s%s %d", r.Method, r.Host, r.URL.Path, rec.code()) })
	rec.onHijack = logOnce // a WebSocket is logged on upgrade, not when it ends
	defer logOnce()
	w.Header().Set("X-Echo-Pod", s.pod)
	switch r.URL.Path {
	case "/healthz":
		if s.unhealthyAfter > 0 && time.Since(s.start) >= s.unhealthyAfter {
			http.Error(rec, "unhealthy", http.StatusInternalServerError)
			return
		}
		_, _ = io.WriteString(rec, "ok")
	case "/ready":
		_, _ = io.WriteString(rec, "ok")
	case "/ws":
		s.websocket(rec, r)
	default:
		s.echo(rec, r)
	}
}

// echoResponse is the body of every echo answer.
type echoResponse struct {
	Pod     string              `json:"pod"`
	Version string              `json:"version"`
	Method  string              `json:"method"`
	Host    string              `json:"host"`
	Path    string              `json:"path"`
	Query   string              `json:"query"`
	Proto   string              `json:"proto"`
	Remote  string              `json:"remote"`
	Headers map[string][]string `json:"headers"`
	Count   int64               `json:"count"`
	Failed  bool                `json:"failed,omitempty"`
}

// echo answers with what it received. Probes and WebSockets do not come
// here, so they neither count towards --fail-every nor are delayed: a kubelet
// probe must not change which test request fails.
func (s *server) echo(w http.ResponseWriter, r *http.Request) {
	n := s.count.Add(1)
	code, delay, err := controls(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if d := s.delay + delay; d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			// The client is gone; 499 (nginx's "client closed request")
			// is only for the log.
			w.WriteHeader(499)
			return
		}
	}
	resp := echoResponse{
		Pod: s.pod, Version: s.version,
		Method: r.Method, Host: r.Host, Path: r.URL.Path, Query: r.URL.RawQuery,
		Proto: r.Proto, Remote: r.RemoteAddr,
		Headers: make(map[string][]string, len(r.Header)),
		Count:   n,
	}
	for k, v := range r.Header {
		k = strings.ToLower(k)
		resp.Headers[k] = append(resp.Headers[k], v...)
	}
	// An injected failure wins over ?status=: it stands for a broken server.
	if s.failEvery > 0 && n%s.failEvery == 0 {
		code, resp.Failed = http.StatusServiceUnavailable, true
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(resp) // an error means the client went away
}

// controls reads the per-request query parameters status and delay.
func controls(r *http.Request) (code int, delay time.Duration, err error) {
	q := r.URL.Query()
	code = http.StatusOK
	if v := q.Get("status"); v != "" {
		// Only final codes: WriteHeader panics below 100 and 1xx would not
		// end the response.
		if code, err = strconv.Atoi(v); err != nil || code < 200 || code > 599 {
			return 0, 0, fmt.Errorf("bad status %q: want 200-599", v)
		}
	}
	if v := q.Get("delay"); v != "" {
		if delay, err = time.ParseDuration(v); err != nil || delay < 0 {
			return 0, 0, fmt.Errorf("bad delay %q: want a duration such as 500ms", v)
		}
	}
	return code, delay, nil
}

// recorder remembers the status for the log line.
type recorder struct {
	http.ResponseWriter
	status   int
	onHijack func()
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Hijack is only used for WebSocket upgrades, so a hijacked request is
// logged as 101.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil {
		r.status = http.StatusSwitchingProtocols
		r.onHijack()
	}
	return c, brw, err
}

// Unwrap lets http.ResponseController reach the real writer (for Flush).
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) code() int {
	if r.status == 0 {
		return http.StatusOK // what net/http sends for a handler that wrote nothing
	}
	return r.status
}

// serveTCP greets each connection with a line naming the pod, then echoes
// every byte until the client closes its side.
func (s *server) serveTCP(l net.Listener) error {
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			// Outlive transient errors such as running out of file
			// descriptors, as net/http does.
			fmt.Fprintln(os.Stderr, "httpecho: accepting:", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if !s.conns.add(c) {
			c.Close() // shutting down
			continue
		}
		go func() {
			defer s.conns.remove(c)
			defer c.Close()
			var n int64
			if _, err := fmt.Fprintf(c, "hello from %s\n", s.pod); err == nil {
				n, _ = io.Copy(c, c)
			}
			s.logf("TCP %s %d", c.RemoteAddr(), n)
		}()
	}
}

// connSet tracks the connections net/http does not (TCP echo and upgraded
// WebSockets), so that shutdown can wait for them and then close them.
type connSet struct {
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	draining bool
	wg       sync.WaitGroup
}

// add tracks c; it refuses once shutdown has begun.
func (cs *connSet) add(c net.Conn) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.draining {
		return false
	}
	if cs.conns == nil {
		cs.conns = make(map[net.Conn]struct{})
	}
	cs.conns[c] = struct{}{}
	cs.wg.Add(1)
	return true
}

func (cs *connSet) remove(c net.Conn) {
	cs.mu.Lock()
	delete(cs.conns, c)
	cs.mu.Unlock()
	cs.wg.Done()
}

// drain refuses new connections, waits for the tracked ones to end until ctx
// is done, then closes those left.
func (cs *connSet) drain(ctx context.Context) {
	cs.mu.Lock()
	cs.draining = true // no wg.Add after this, so Wait is safe
	cs.mu.Unlock()
	done := make(chan struct{})
	go func() { cs.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-ctx.Done():
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for c := range cs.conns {
		c.Close()
	}
}
