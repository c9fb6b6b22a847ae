package main

// A minimal RFC 6455 WebSocket, server and client, so that the workload
// needs nothing beyond the standard library: no extensions, no subprotocols,
// messages of up to maxMessage bytes (fragmented or not), ping, pong and
// close.

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"
)

const (
	opContinuation byte = 0x0
	opText         byte = 0x1
	opBinary       byte = 0x2
	opClose        byte = 0x8
	opPing         byte = 0x9
	opPong         byte = 0xa

	closeNormal        = 1000
	closeProtocolError = 1002
	closeInvalidData   = 1007
	closeTooBig        = 1009

	maxMessage = 64 << 10 // what the server takes
	maxReply   = 1 << 20  // what the client takes: a message plus the pod

	// wsGUID is the constant RFC 6455 mixes into the handshake key.
	wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
)

type frame struct {
	fin     bool
	op      byte
	payload []byte
}

// closeError is a protocol violation by the peer: the connection ends with
// a close frame carrying code.
type closeError struct {
	code   uint16
	reason string
}

func (e *closeError) Error() string { return fmt.Sprintf("websocket close %d: %s", e.code, e.reason) }

func closeFrame(code uint16, reason string) frame {
	return frame{fin: true, op: opClose, payload: append(binary.BigEndian.AppendUint16(nil, code), reason...)}
}

func acceptKey(key string) string {
	sum := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// readFrame reads one frame of at most limit bytes. masked is whether the
// peer must mask: clients always do, servers never.
func readFrame(r io.Reader, masked bool, limit uint64) (frame, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return frame{}, err
	}
	f := frame{fin: h[0]&0x80 != 0, op: h[0] & 0x0f}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return frame{}, err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return frame{}, err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	switch {
	case h[0]&0x70 != 0:
		return frame{}, &closeError{closeProtocolError, "reserved bits set"}
	case (f.op > opBinary && f.op < opClose) || f.op > opPong:
		return frame{}, &closeError{closeProtocolError, fmt.Sprintf("unknown opcode %d", f.op)}
	case f.op >= opClose && (!f.fin || n > 125):
		return frame{}, &closeError{closeProtocolError, "fragmented or long control frame"}
	case (h[1]&0x80 != 0) != masked:
		return frame{}, &closeError{closeProtocolError, "wrong masking"}
	case n > limit:
		return frame{}, &closeError{closeTooBig, "message too big"}
	}
	var key [4]byte
	if masked {
		if _, err := io.ReadFull(r, key[:]); err != nil {
			return frame{}, err
		}
	}
	f.payload = make([]byte, n)
	if _, err := io.ReadFull(r, f.payload); err != nil {
		return frame{}, err
	}
	if masked {
		for i := range f.payload {
			f.payload[i] ^= key[i%4]
		}
	}
	return f, nil
}

// writeFrame writes f in one Write; a client must mask.
func writeFrame(w io.Writer, f frame, mask bool) error {
	b := make([]byte, 0, 14+len(f.payload))
	b0 := f.op
	if f.fin {
		b0 |= 0x80
	}
	var m byte
	if mask {
		m = 0x80
	}
	b = append(b, b0)
	switch n := len(f.payload); {
	case n < 126:
		b = append(b, m|byte(n))
	case n <= 0xffff:
		b = binary.BigEndian.AppendUint16(append(b, m|126), uint16(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, m|127), uint64(n))
	}
	if mask {
		var key [4]byte
		_, _ = rand.Read(key[:]) // crypto/rand.Read does not fail
		b = append(b, key[:]...)
		for i, c := range f.payload {
			b = append(b, c^key[i%4])
		}
	} else {
		b = append(b, f.payload...)
	}
	_, err := w.Write(b)
	return err
}

// websocket serves /ws: it echoes each message back, prefixed with the pod.
func (s *server) websocket(w http.ResponseWriter, r *http.Request) {
	key, status, err := checkUpgrade(r)
	if err != nil {
		if status == http.StatusUpgradeRequired {
			w.Header().Set("Sec-WebSocket-Version", "13")
		}
		http.Error(w, err.Error(), status)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, fmt.Sprintf("cannot take over the connection: %v", err), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	if !s.conns.add(conn) {
		return // shutting down
	}
	defer s.conns.remove(conn)
	_ = conn.SetDeadline(time.Time{}) // the header timeout must not end the session
	_, err = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\n"+
		"Upgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Accept: "+acceptKey(key)+"\r\n"+
		"X-Echo-Pod: "+s.pod+"\r\n\r\n")
	if err != nil {
		return
	}
	// brw.Reader may already hold frames the client sent after its request.
	var ce *closeError
	if err := s.wsEcho(conn, brw.Reader); errors.As(err, &ce) {
		_ = writeFrame(conn, closeFrame(ce.code, ce.reason), false)
		// Read on for a while until the client closes: closing with its
		// bytes unread would send a reset, which can destroy our close
		// frame before the client reads it.
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, brw.Reader)
	}
}

// checkUpgrade validates a WebSocket opening handshake and returns its key,
// or the status to refuse it with.
func checkUpgrade(r *http.Request) (key string, status int, err error) {
	if r.Method != http.MethodGet || !hasToken(r.Header, "Connection", "upgrade") || !hasToken(r.Header, "Upgrade", "websocket") {
		return "", http.StatusBadRequest, errors.New("not a WebSocket upgrade (HTTP/1.1 GET with Connection: Upgrade and Upgrade: websocket)")
	}
	if r.Header.Get("Sec-WebSocket-Version") != "13" {
		return "", http.StatusUpgradeRequired, errors.New("unsupported Sec-WebSocket-Version: want 13")
	}
	key = r.Header.Get("Sec-WebSocket-Key")
	if b, err := base64.StdEncoding.DecodeString(key); err != nil || len(b) != 16 {
		return "", http.StatusBadRequest, errors.New("bad Sec-WebSocket-Key")
	}
	return key, 0, nil
}

// hasToken reports whether a comma-separated header such as Connection
// lists token.
func hasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// wsEcho runs a server session until the peer closes or errs.
func (s *server) wsEcho(conn net.Conn, r *bufio.Reader) error {
	var msg []byte
	var msgOp byte // opcode of the message being put together; 0 if none
	for {
		f, err := readFrame(r, true, maxMessage)
		if err != nil {
			return err
		}
		switch f.op {
		case opPing:
			if err := writeFrame(conn, frame{fin: true, op: opPong, payload: f.payload}, false); err != nil {
				return err
			}
			continue
		case opPong:
			continue
		case opClose:
			// Answer with the peer's code, as RFC 6455 section 5.5.1 suggests.
			if len(f.payload) == 1 {
				return &closeError{closeProtocolError, "one-byte close payload"}
			}
			reply := frame{fin: true, op: opClose}
			if len(f.payload) >= 2 {
				reply.payload = f.payload[:2]
			}
			return writeFrame(conn, reply, false)
		case opText, opBinary:
			if msgOp != 0 {
				return &closeError{closeProtocolError, "new message inside a fragmented one"}
			}
			msgOp, msg = f.op, f.payload
		case opContinuation:
			if msgOp == 0 {
				return &closeError{closeProtocolError, "continuation outside a message"}
			}
			if len(msg)+len(f.payload) > maxMessage {
				return &closeError{closeTooBig, "message too big"}
			}
			msg = append(msg, f.payload...)
		}
		if !f.fin {
			continue
		}
		if msgOp == opText && !utf8.Valid(msg) {
			return &closeError{closeInvalidData, "text is not UTF-8"}
		}
		reply := append([]byte(s.pod+": "), msg...)
		if err := writeFrame(conn, frame{fin: true, op: msgOp, payload: reply}, false); err != nil {
			return err
		}
		msgOp, msg = 0, nil
	}
}

// wsConn is the client side of a WebSocket.
type wsConn struct {
	conn net.Conn
	r    *bufio.Reader
}

// wsDial opens a WebSocket to a ws:// or wss:// URL. host, if set, replaces
// the Host header. ctx's deadline bounds the whole session.
func wsDial(ctx context.Context, rawURL, host string, header http.Header) (*wsConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("parsing URL: %w", err)
	}
	port := "80"
	switch u.Scheme {
	case "ws":
	case "wss":
		port = "443"
	default:
		return nil, fmt.Errorf("URL %q: want ws:// or wss://", rawURL)
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	d := &net.Dialer{}
	var conn net.Conn
	if u.Scheme == "wss" {
		conn, err = (&tls.Dialer{NetDialer: d}).DialContext(ctx, "tcp", addr)
	} else {
		conn, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	c, err := handshake(conn, u, host, header)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func handshake(conn net.Conn, u *url.URL, host string, header http.Header) (*wsConn, error) {
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("building handshake: %w", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if host != "" {
		req.Host = host
	}
	var nonce [16]byte
	_, _ = rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", key)
	req.Header.Set("Sec-WebSocket-Version", "13")
	if err := req.Write(conn); err != nil {
		return nil, fmt.Errorf("sending handshake: %w", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, fmt.Errorf("reading handshake response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, fmt.Errorf("handshake answered %s", resp.Status)
	}
	if resp.Header.Get("Sec-WebSocket-Accept") != acceptKey(key) {
		return nil, errors.New("handshake answered a wrong Sec-WebSocket-Accept")
	}
	return &wsConn{conn: conn, r: br}, nil
}

func (c *wsConn) send(op byte, msg []byte) error {
	return writeFrame(c.conn, frame{fin: true, op: op, payload: msg}, true)
}

// receive returns the next message, answering pings on the way.
func (c *wsConn) receive() (op byte, msg []byte, err error) {
	for {
		f, err := readFrame(c.r, false, maxReply)
		if err != nil {
			return 0, nil, err
		}
		switch f.op {
		case opPing:
			if err := writeFrame(c.conn, frame{fin: true, op: opPong, payload: f.payload}, true); err != nil {
				return 0, nil, err
			}
			continue
		case opPong:
			continue
		case opClose:
			return 0, nil, fmt.Errorf("closed by the server: %s", describeClose(f.payload))
		case opContinuation:
			if op == 0 {
				return 0, nil, errors.New("continuation outside a message")
			}
			if len(msg)+len(f.payload) > maxReply {
				return 0, nil, errors.New("message too big")
			}
			msg = append(msg, f.payload...)
		default:
			op, msg = f.op, f.payload
		}
		if f.fin {
			return op, msg, nil
		}
	}
}

// close ends the session politely: a close frame, then the wait for the
// server's, within the session's deadline.
func (c *wsConn) close() {
	if writeFrame(c.conn, closeFrame(closeNormal, ""), true) == nil {
		for {
			if f, err := readFrame(c.r, false, maxReply); err != nil || f.op == opClose {
				break
			}
		}
	}
	c.conn.Close()
}

func describeClose(payload []byte) string {
	if len(payload) < 2 {
		return "no status"
	}
	return fmt.Sprintf("%d %s", binary.BigEndian.Uint16(payload), payload[2:])
}
