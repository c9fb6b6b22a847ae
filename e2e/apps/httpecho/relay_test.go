package main

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// TestRelay: bytes sent to the relay reach the target and its answer comes
// back; the relay's half-close lets the target see the end of the stream.
func TestRelay(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	go func() {
		c, err := target.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until the relay half-closes
		_, _ = c.Write(append([]byte("got "), b...))
	}()
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := probe.Addr().String()
	probe.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- relay(ctx, []string{"--listen=" + addr, "--to=" + target.Addr().String()}, io.Discard) }()
	var c net.Conn
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err = net.Dial("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "got hello" {
		t.Fatalf("through the relay: %q, %v", b, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("relay: %v", err)
	}
	if err := relay(ctx, nil, io.Discard); err == nil {
		t.Error("relay without --to started")
	}
}
