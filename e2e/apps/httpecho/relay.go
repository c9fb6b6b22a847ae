package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"sync"
)

// relay forwards every TCP connection on --listen to --to, bytes as they
// are (TLS passes through): a pod that stands for a service running
// elsewhere.
func relay(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":8443", "address to accept connections on")
	to := fs.String("to", "", "host:port to forward each connection to")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *to == "" {
		return fmt.Errorf("%w: --to is required", errUsage)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		in, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer in.Close()
			out, err := (&net.Dialer{}).DialContext(ctx, "tcp", *to)
			if err != nil {
				fmt.Fprintf(stderr, "relay: %v\n", err)
				return
			}
			defer out.Close()
			var wg sync.WaitGroup
			wg.Add(2)
			copyHalf := func(dst, src net.Conn) {
				defer wg.Done()
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}
			go copyHalf(out, in)
			go copyHalf(in, out)
			wg.Wait()
		}()
	}
}
