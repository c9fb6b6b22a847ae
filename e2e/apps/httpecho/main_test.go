package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"math/big"
	"net"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const testPod, testVersion = "test-pod", "v9"

func testConfig() config { return config{pod: testPod, version: testVersion} }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

type testServer struct {
	s         *server
	log       *syncBuffer
	http, tcp string       // host:port
	stop      func() error // shuts down, as SIGTERM does; run's error
}

func listenLocal(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// runServer runs a server on ls until the test ends or stop is called.
func runServer(t *testing.T, cfg config, ls listeners) *testServer {
	t.Helper()
	ts := &testServer{log: &syncBuffer{}}
	ts.s = newServer(cfg, ts.log)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ts.s.run(ctx, ls) }()
	ts.stop = sync.OnceValue(func() error { cancel(); return <-done })
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Errorf("run: %v", err)
		}
	})
	return ts
}

// startServer runs a server with an HTTP and a TCP echo port.
func startServer(t *testing.T, cfg config) *testServer {
	t.Helper()
	hl, tl := listenLocal(t), listenLocal(t)
	ts := runServer(t, cfg, listeners{http: []net.Listener{hl}, tcp: tl})
	ts.http, ts.tcp = hl.Addr().String(), tl.Addr().String()
	return ts
}

// newClient is an HTTP client that sends only the headers it is given
// (no Accept-Encoding), over HTTP/1.1 or h2c.
func newClient(t *testing.T, h2c bool) *http.Client {
	var p http.Protocols
	if h2c {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &p, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func get(t *testing.T, c *http.Client, url string, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

func TestEcho(t *testing.T) {
	for _, tc := range []struct {
		name  string
		h2c   bool
		proto string
	}{
		{"HTTP/1.1", false, "HTTP/1.1"},
		{"h2c", true, "HTTP/2.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, testConfig())
			resp, body := get(t, newClient(t, tc.h2c), "http://"+ts.http+"/some/path?a=1&b=two",
				http.Header{"X-Test": {"yes"}, "X-Multi": {"1", "2"}})
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d, want 200; body %s", resp.StatusCode, body)
			}
			if got := resp.Header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type %q, want application/json", got)
			}
			if got := resp.Header.Get("X-Echo-Pod"); got != testPod {
				t.Errorf("x-echo-pod %q, want %q", got, testPod)
			}
			var got echoResponse
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatalf("body %s: %v", body, err)
			}
			if !strings.HasPrefix(got.Remote, "127.0.0.1:") {
				t.Errorf("remote %q, want 127.0.0.1:port", got.Remote)
			}
			want := echoResponse{
				Pod: testPod, Version: testVersion,
				Method: "GET", Host: ts.http, Path: "/some/path", Query: "a=1&b=two",
				Proto: tc.proto, Remote: got.Remote,
				Headers: map[string][]string{
					"user-agent": {"Go-http-client/" + strings.TrimPrefix(tc.proto, "HTTP/")},
					"x-test":     {"yes"},
					"x-multi":    {"1", "2"},
				},
				Count: 1,
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("echo (-want +got):\n%s", diff)
			}
		})
	}
}

// TestControls checks the answers to query controls, --fail-every and the
// probe endpoints.
func TestControls(t *testing.T) {
	type req struct {
		path string
		code int
	}
	for _, tc := range []struct {
		name string
		cfg  func(*config)
		reqs []req
	}{
		{name: "status", reqs: []req{{"/?status=503", 503}, {"/x?status=418", 418}, {"/?status=200", 200}}},
		{name: "bad status", reqs: []req{{"/?status=abc", 400}, {"/?status=99", 400}, {"/?status=600", 400}}},
		{name: "delay", reqs: []req{{"/?delay=5ms", 200}, {"/?delay=soon", 400}, {"/?delay=-1s", 400}}},
		{
			// Probes neither count nor fail.
			name: "fail every 2",
			cfg:  func(c *config) { c.failEvery = 2 },
			reqs: []req{{"/", 200}, {"/healthz", 200}, {"/a", 503}, {"/ready", 200}, {"/?status=201", 201}, {"/?status=201", 503}, {"/", 200}},
		},
		{name: "healthy", reqs: []req{{"/healthz", 200}, {"/ready", 200}}},
		{
			name: "unhealthy after",
			cfg:  func(c *config) { c.unhealthyAfter = time.Nanosecond },
			reqs: []req{{"/healthz", 500}, {"/ready", 200}, {"/", 200}},
		},
		{name: "ws without upgrade", reqs: []req{{"/ws", 400}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig()
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			ts := startServer(t, cfg)
			c := newClient(t, false)
			for _, r := range tc.reqs {
				resp, body := get(t, c, "http://"+ts.http+r.path, nil)
				if resp.StatusCode != r.code {
					t.Errorf("GET %s: status %d, want %d; body %s", r.path, resp.StatusCode, r.code, body)
				}
				if resp.Header.Get("Content-Type") != "application/json" {
					continue
				}
				var got echoResponse
				if err := json.Unmarshal(body, &got); err != nil {
					t.Fatalf("GET %s: body %s: %v", r.path, body, err)
				}
				if wantFailed := cfg.failEvery > 0 && r.code == 503; got.Failed != wantFailed {
					t.Errorf("GET %s: failed %v, want %v", r.path, got.Failed, wantFailed)
				}
			}
		})
	}
}

func TestDelay(t *testing.T) {
	cfg := testConfig()
	cfg.delay = 30 * time.Millisecond
	ts := startServer(t, cfg)
	c := newClient(t, false)

	start := time.Now()
	if resp, _ := get(t, c, "http://"+ts.http+"/?delay=20ms", nil); resp.StatusCode != 200 {
		t.Errorf("status %d, want 200", resp.StatusCode)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Errorf("answered after %v, want at least 30ms (--delay) + 20ms (?delay)", d)
	}

	// A client giving up ends the wait, which the log shows as 499.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+ts.http+"/gone?delay=1h", nil)
	if _, err := c.Do(req); err == nil {
		t.Fatal("request with delay=1h did not time out")
	}
	waitForLog(t, ts.log, `GET \S+/gone 499`)
}

func waitForLog(t *testing.T, log *syncBuffer, pattern string) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) ` + pattern + `$`)
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if re.MatchString(log.String()) {
			return
		}
	}
	t.Errorf("no log line matches %s in:\n%s", re, log)
}

func TestLog(t *testing.T) {
	ts := startServer(t, testConfig())
	get(t, newClient(t, false), "http://"+ts.http+"/hello?q=1", nil)
	get(t, newClient(t, false), "http://"+ts.http+"/?status=503", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, err := wsDial(ctx, "ws://"+ts.http+"/ws", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.close()
	host := regexp.QuoteMeta(ts.http)
	waitForLog(t, ts.log, "GET "+host+"/hello 200")
	waitForLog(t, ts.log, "GET "+host+"/ 503")
	waitForLog(t, ts.log, "GET "+host+"/ws 101") // at the upgrade, before the session ends
}

func TestTCPEcho(t *testing.T) {
	ts := startServer(t, testConfig())
	conn, err := net.Dial("tcp", ts.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	hello, err := r.ReadString('\n')
	if err != nil || hello != "hello from "+testPod+"\n" {
		t.Fatalf("hello %q, %v; want %q", hello, err, "hello from "+testPod+"\n")
	}
	const msg = "abc\nno newline at the end"
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(r, got); err != nil || string(got) != msg {
		t.Fatalf("echo %q, %v; want %q", got, err, msg)
	}
	// Our EOF ends the echo, and the server closes.
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(r); err != nil || len(rest) > 0 {
		t.Errorf("after EOF: read %q, %v; want nothing and EOF", rest, err)
	}
}

func TestWebSocket(t *testing.T) {
	text := func(s string) frame { return frame{fin: true, op: opText, payload: []byte(s)} }
	closeCode := func(code uint16) frame { return frame{fin: true, op: opClose, payload: closeFrame(code, "").payload} }
	masked := func(fs ...frame) []byte {
		var b bytes.Buffer
		for _, f := range fs {
			_ = writeFrame(&b, f, true)
		}
		return b.Bytes()
	}
	for _, tc := range []struct {
		name string
		send []byte // raw frames
		want []frame
	}{
		{"text", masked(text("hello")), []frame{text("test-pod: hello")}},
		{"binary", masked(frame{true, opBinary, []byte{0, 1, 2}}), []frame{{true, opBinary, []byte("test-pod: \x00\x01\x02")}}},
		{"two messages", masked(text("a"), text("b")), []frame{text("test-pod: a"), text("test-pod: b")}},
		{
			"fragmented, with a ping inside",
			masked(frame{false, opText, []byte("hel")}, frame{true, opPing, []byte("p")}, frame{true, opContinuation, []byte("lo")}),
			[]frame{{true, opPong, []byte("p")}, text("test-pod: hello")},
		},
		{"64 KiB", masked(frame{true, opBinary, make([]byte, maxMessage)}), []frame{{true, opBinary, append([]byte("test-pod: "), make([]byte, maxMessage)...)}}},
		{"close echoes the code", masked(closeFrame(closeNormal, "bye")), []frame{closeCode(closeNormal)}},
		{"too big", masked(frame{true, opBinary, make([]byte, maxMessage+1)}), []frame{closeFrame(closeTooBig, "message too big")}},
		{"unmasked", func() []byte { var b bytes.Buffer; _ = writeFrame(&b, text("x"), false); return b.Bytes() }(), []frame{closeFrame(closeProtocolError, "wrong masking")}},
		{"invalid UTF-8", masked(text("\xff")), []frame{closeFrame(closeInvalidData, "text is not UTF-8")}},
		{"continuation first", masked(frame{true, opContinuation, []byte("x")}), []frame{closeFrame(closeProtocolError, "continuation outside a message")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, testConfig())
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := wsDial(ctx, "ws://"+ts.http+"/ws", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.conn.Close()
			if _, err := c.conn.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			var got []frame
			for range tc.want {
				f, err := readFrame(c.r, false, maxReply)
				if err != nil {
					t.Fatalf("after %d frames: %v", len(got), err)
				}
				got = append(got, f)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(frame{})); diff != "" {
				t.Errorf("frames (-want +got):\n%s", diff)
			}
		})
	}
}

func TestWebSocketRefused(t *testing.T) {
	ts := startServer(t, testConfig())
	upgrade := http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Key": {"dGhlIHNhbXBsZSBub25jZQ=="}}
	for _, tc := range []struct {
		name    string
		version string
		key     string
		code    int
	}{
		{"old version", "8", "", http.StatusUpgradeRequired},
		{"no key", "13", "-", http.StatusBadRequest},
		{"short key", "13", "c2hvcnQ=", http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := upgrade.Clone()
			h.Set("Sec-WebSocket-Version", tc.version)
			switch tc.key {
			case "":
			case "-":
				h.Del("Sec-WebSocket-Key")
			default:
				h.Set("Sec-WebSocket-Key", tc.key)
			}
			resp, body := get(t, newClient(t, false), "http://"+ts.http+"/ws", h)
			if resp.StatusCode != tc.code {
				t.Errorf("status %d, want %d; body %s", resp.StatusCode, tc.code, body)
			}
			if tc.code == http.StatusUpgradeRequired && resp.Header.Get("Sec-WebSocket-Version") != "13" {
				t.Errorf("426 without Sec-WebSocket-Version: 13")
			}
		})
	}
}

func TestTLS(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	l := listenLocal(t)
	runServer(t, testConfig(), listeners{tls: l, cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}})

	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	for _, tc := range []struct {
		name  string
		h2    bool
		proto string
	}{{"HTTP/1.1", false, "HTTP/1.1"}, {"h2", true, "HTTP/2.0"}} {
		t.Run(tc.name, func(t *testing.T) {
			var p http.Protocols
			p.SetHTTP1(!tc.h2)
			p.SetHTTP2(tc.h2)
			tr := &http.Transport{Protocols: &p, TLSClientConfig: &tls.Config{RootCAs: roots}}
			defer tr.CloseIdleConnections()
			resp, body := get(t, &http.Client{Transport: tr}, "https://"+l.Addr().String()+"/tls", nil)
			var got echoResponse
			if err := json.Unmarshal(body, &got); err != nil || resp.StatusCode != 200 {
				t.Fatalf("status %d, body %s, %v", resp.StatusCode, body, err)
			}
			if got.Pod != testPod || got.Path != "/tls" || got.Proto != tc.proto {
				t.Errorf("pod %q, path %q, proto %q; want %q, /tls, %s", got.Pod, got.Path, got.Proto, testPod, tc.proto)
			}
		})
	}
}

// TestShutdown checks that shutting down lets a request in flight finish,
// returns no error and stops accepting.
func TestShutdown(t *testing.T) {
	ts := startServer(t, testConfig())
	c := newClient(t, false)
	type result struct {
		code int
		err  error
	}
	res := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + ts.http + "/?delay=300ms")
		if err != nil {
			res <- result{0, err}
			return
		}
		resp.Body.Close()
		res <- result{resp.StatusCode, nil}
	}()
	for ts.s.count.Load() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	if err := ts.stop(); err != nil {
		t.Errorf("run: %v", err)
	}
	if d := time.Since(start); d >= shutdownGrace {
		t.Errorf("shutdown took %v, want less than the grace period", d)
	}
	if r := <-res; r.code != 200 || r.err != nil {
		t.Errorf("request in flight: status %d, %v; want 200", r.code, r.err)
	}
	for _, addr := range []string{ts.http, ts.tcp} {
		if conn, err := net.Dial("tcp", addr); err == nil {
			conn.Close()
			t.Errorf("%s still accepts after shutdown", addr)
		}
	}
}

// clientLines runs the client and returns its output lines, decoded.
func clientLines(t *testing.T, args ...string) []map[string]any {
	t.Helper()
	var out bytes.Buffer
	if err := runClient(context.Background(), args, &out, io.Discard); err != nil {
		t.Fatalf("client %q: %v", args, err)
	}
	var lines []map[string]any
	for line := range strings.Lines(out.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		lines = append(lines, m)
	}
	return lines
}

// at returns the value at a slash-separated path of object keys.
func at(v any, path string) any {
	for k := range strings.SplitSeq(path, "/") {
		m, _ := v.(map[string]any)
		v = m[k]
	}
	return v
}

func TestClient(t *testing.T) {
	ts := startServer(t, testConfig())
	closed := listenLocal(t)
	closed.Close()
	base := "http://" + ts.http
	for _, tc := range []struct {
		name     string
		args     []string
		want     map[string]any // at(line, key) for each key; nil: absent
		errorHas string         // the line's error contains this
	}{
		{
			name: "http",
			args: []string{"--url", base + "/x?y=1", "--header", "X-A: b", "--host", "h.example"},
			want: map[string]any{
				"code": 200.0, "error": "", "pod": testPod, "version": testVersion, "raw": nil,
				"body/path": "/x", "body/query": "y=1", "body/host": "h.example", "body/proto": "HTTP/1.1",
				"body/method": "GET", "body/headers/x-a": []any{"b"}, "body/headers/accept-encoding": nil,
				"resp_headers/x-echo-pod": testPod, "resp_headers/content-type": "application/json",
			},
		},
		{
			name: "h2c, POST, Host as a header",
			args: []string{"--url", base + "/", "--h2c", "--method", "POST", "--body", "hi", "--header", "Host: h2.example"},
			want: map[string]any{
				"code": 200.0, "body/proto": "HTTP/2.0", "body/method": "POST", "body/host": "h2.example",
				"body/headers/content-length": []any{"2"},
			},
		},
		{
			name: "failure status",
			args: []string{"--url", base + "/?status=503"},
			want: map[string]any{"code": 503.0, "error": "", "pod": testPod, "body/failed": nil},
		},
		{
			name: "not JSON",
			args: []string{"--url", base + "/healthz"},
			want: map[string]any{"code": 200.0, "raw": "ok", "body": nil, "pod": testPod, "version": ""},
		},
		{
			name:     "no server",
			args:     []string{"--url", "http://" + closed.Addr().String() + "/", "--timeout", "1s"},
			want:     map[string]any{"code": 0.0, "pod": "", "resp_headers": map[string]any{}},
			errorHas: "connection refused",
		},
		{
			name: "tcp",
			args: []string{"--tcp", ts.tcp},
			want: map[string]any{"code": 1.0, "error": "", "hello": "hello from " + testPod, "echo": "ping"},
		},
		{
			name: "websocket",
			args: []string{"--ws", "ws://" + ts.http + "/ws"},
			want: map[string]any{"code": 101.0, "error": "", "reply": testPod + ": ping"},
		},
		{
			name:     "not a websocket",
			args:     []string{"--ws", "ws://" + ts.http + "/other"},
			want:     map[string]any{"code": 0.0, "reply": ""},
			errorHas: "handshake answered 200 OK",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := clientLines(t, append(tc.args, "--count", "3")...)
			var is []int
			for _, l := range lines {
				i, _ := l["i"].(float64)
				is = append(is, int(i))
				got := map[string]any{}
				for k := range tc.want {
					got[k] = at(l, k)
				}
				if diff := cmp.Diff(tc.want, got); diff != "" {
					t.Errorf("line %v (-want +got):\n%s", l, diff)
				}
				if e, _ := l["error"].(string); !strings.Contains(e, tc.errorHas) {
					t.Errorf("error %q, want it to contain %q", e, tc.errorHas)
				}
				if ms, ok := l["ms"].(float64); !ok || ms < 0 {
					t.Errorf("ms %v, want a duration", l["ms"])
				}
			}
			sort.Ints(is)
			if diff := cmp.Diff([]int{0, 1, 2}, is); diff != "" {
				t.Errorf("line numbers (-want +got):\n%s", diff)
			}
		})
	}
}

// TestClientConnections checks which requests share a connection, by the
// client address the server saw.
func TestClientConnections(t *testing.T) {
	ts := startServer(t, testConfig())
	for _, tc := range []struct {
		name  string
		args  []string
		conns int
	}{
		{"keep-alive", nil, 1},
		{"new-conn", []string{"--new-conn"}, 4},
		{"h2c keep-alive", []string{"--h2c", "--concurrency", "2"}, 1},
		{"h2c new-conn", []string{"--h2c", "--new-conn"}, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := clientLines(t, append(tc.args, "--url", "http://"+ts.http+"/", "--count", "4")...)
			remotes := map[any]bool{}
			for _, l := range lines {
				remotes[at(l, "body/remote")] = true
			}
			if len(lines) != 4 || len(remotes) != tc.conns {
				t.Errorf("%d requests from %d addresses %v, want 4 from %d", len(lines), len(remotes), remotes, tc.conns)
			}
		})
	}
}

func TestClientRate(t *testing.T) {
	ts := startServer(t, testConfig())
	url := "http://" + ts.http + "/"

	// Requests are due at 0, 50, 100 and 150ms.
	start := time.Now()
	lines := clientLines(t, "--url", url, "--count", "4", "--qps", "20", "--concurrency", "2")
	if d := time.Since(start); len(lines) != 4 || d < 150*time.Millisecond {
		t.Errorf("%d requests in %v, want 4 in at least 150ms", len(lines), d)
	}

	// Due at 0, 50, 100, 150ms, and none from 200ms.
	lines = clientLines(t, "--url", url, "--duration", "200ms", "--qps", "20", "--count", "100")
	if len(lines) < 3 || len(lines) > 4 {
		t.Errorf("%d requests in 200ms at 20/s, want 4 (3 on a slow machine)", len(lines))
	}
}

func TestClientFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want error
	}{
		{"no mode", nil, errUsage},
		{"two modes", []string{"--url", "http://a/", "--tcp", "a:1"}, errUsage},
		{"bad url", []string{"--url", "a/b"}, errUsage},
		{"h2c over https", []string{"--url", "https://a/", "--h2c"}, errUsage},
		{"bad method", []string{"--url", "http://a/", "--method", "GET ME"}, errUsage},
		{"bad header", []string{"--url", "http://a/", "--header", "no colon"}, errUsage},
		{"zero count", []string{"--url", "http://a/", "--count", "0"}, errUsage},
		{"zero concurrency", []string{"--url", "http://a/", "--concurrency", "0"}, errUsage},
		{"negative qps", []string{"--url", "http://a/", "--qps", "-1"}, errUsage},
		{"bad tcp", []string{"--tcp", "nohost"}, errUsage},
		{"bad ws", []string{"--ws", "http://a/ws"}, errUsage},
		{"unknown flag", []string{"--url", "http://a/", "--nope"}, errUsage},
		{"extra argument", []string{"--url", "http://a/", "3"}, errUsage},
		{"help", []string{"-h"}, flag.ErrHelp},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := runClient(context.Background(), tc.args, &out, io.Discard)
			if !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
			if out.Len() > 0 {
				t.Errorf("output %q, want none", out.String())
			}
		})
	}
}
