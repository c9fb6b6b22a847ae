// Command echo is the e2e and demo workload: a gRPC echo server that
// reports which pod answered, the caller's SPIFFE ID and the request
// metadata, and a client that calls it. With GRPC_XDS_BOOTSTRAP set both use
// gRPC's own xDS support (proxyless mode): the client dials xds:/// targets
// and the server is an xds.GRPCServer with xDS credentials, so Trellis's
// routes, clusters, endpoints, server listeners and RBAC are consumed by an
// xDS implementation independent of Trellis and of Envoy.
//
// The service is defined by hand (no generated code): echo.Echo/Echo takes a
// google.protobuf.StringValue and returns a google.protobuf.Struct.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

type echoServer interface {
	Echo(context.Context, *wrapperspb.StringValue) (*structpb.Struct, error)
}

func handler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new(wrapperspb.StringValue)
	if err := dec(in); err != nil {
		return nil, err
	}
	return srv.(echoServer).Echo(ctx, in)
}

// Echo and Other answer alike; two methods let tests match on the method.
var serviceDesc = grpc.ServiceDesc{
	ServiceName: "echo.Echo",
	HandlerType: (*echoServer)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Echo", Handler: handler}, {MethodName: "Other", Handler: handler}},
}

type server struct {
	pod, version string
	failEvery    int64
	delay        time.Duration
	calls        atomic.Int64
}

func (s *server) Echo(ctx context.Context, in *wrapperspb.StringValue) (*structpb.Struct, error) {
	n := s.calls.Add(1)
	if s.failEvery > 0 && n%s.failEvery == 0 {
		return nil, status.Errorf(codes.Unavailable, "%s fails every %d calls (this is call %d)", s.pod, s.failEvery, n)
	}
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	out := map[string]any{"pod": s.pod, "version": s.version, "message": in.GetValue(), "peer": "", "spiffeID": ""}
	if p, ok := peer.FromContext(ctx); ok {
		out["peer"] = p.Addr.String()
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			for _, u := range ti.State.PeerCertificates[0].URIs {
				out["spiffeID"] = u.String()
			}
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	headers := map[string]any{}
	for k, v := range md {
		headers[k] = strings.Join(v, ",")
	}
	out["headers"] = headers
	return structpb.NewStruct(out)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: echo server|client|idle [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = serve(os.Args[2:])
	case "client":
		err = call(os.Args[2:])
	case "idle":
		// A pod's main process that does nothing until stopped; tests exec
		// clients in the pod.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		<-ctx.Done()
		stop()
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}

func useXDS() bool {
	return os.Getenv("GRPC_XDS_BOOTSTRAP") != "" || os.Getenv("GRPC_XDS_BOOTSTRAP_CONFIG") != ""
}

func serve(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	addr := fs.String("address", "0.0.0.0:50051", "listen address")
	pod := fs.String("pod", os.Getenv("POD_NAME"), "name reported in responses")
	version := fs.String("version", os.Getenv("VERSION"), "version reported in responses")
	failEvery := fs.Int64("fail-every", 0, "answer every n-th call with UNAVAILABLE (0: never)")
	delay := fs.Duration("delay", 0, "wait this long before answering")
	_ = fs.Parse(args)
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var g interface {
		RegisterService(*grpc.ServiceDesc, any)
		Serve(net.Listener) error
		GracefulStop()
	}
	if useXDS() {
		creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
		if err != nil {
			return err
		}
		xs, err := xds.NewGRPCServer(grpc.Creds(creds))
		if err != nil {
			return err
		}
		g = xs
	} else {
		g = grpc.NewServer()
	}
	g.RegisterService(&serviceDesc, &server{pod: *pod, version: *version, failEvery: *failEvery, delay: *delay})
	// grpc.health.v1, for gRPC probes: SERVING for "" and "echo.Echo".
	hs := health.NewServer()
	hs.SetServingStatus(serviceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(g, hs)
	fmt.Printf("LISTENING %s\n", lis.Addr())
	go func() { <-ctx.Done(); g.GracefulStop() }()
	return g.Serve(lis)
}

// call makes n calls (0: until interrupted) and prints one JSON line per
// call: the response, or {"error": ..., "code": ...}, with the call's
// latency in ms.
func call(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	target := fs.String("target", "", "e.g. xds:///echo.default.svc.cluster.local:50051")
	n := fs.Int("n", 1, "number of calls; 0 calls until interrupted")
	interval := fs.Duration("interval", 0, "pause between calls")
	timeout := fs.Duration("timeout", 10*time.Second, "per-call timeout")
	wait := fs.Bool("wait-for-ready", true, "wait for the channel to be ready (xDS resources and endpoints) instead of failing fast")
	plaintext := fs.Bool("plaintext", false, "no xDS and no TLS, even with a bootstrap (a client outside the mesh)")
	reconnect := fs.Bool("reconnect", false, "a new channel (and TLS handshake) for every call")
	rpc := fs.String("method", "Echo", "method of echo.Echo to call: Echo or Other")
	var md multiFlag
	fs.Var(&md, "header", "request metadata key=value (repeatable)")
	_ = fs.Parse(args)
	xdsMode := useXDS() && !*plaintext
	var creds credentials.TransportCredentials = insecure.NewCredentials()
	if xdsMode {
		var err error
		if creds, err = xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()}); err != nil {
			return err
		}
	}
	dial := func() (*grpc.ClientConn, error) {
		if !xdsMode {
			return grpc.NewClient(strings.TrimPrefix(*target, "xds:///"), grpc.WithTransportCredentials(creds))
		}
		return grpc.NewClient(*target, grpc.WithTransportCredentials(creds))
	}
	conn, err := dial()
	if err != nil {
		return err
	}
	defer func() { conn.Close() }()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var pairs []string
	for _, kv := range md {
		k, v, _ := strings.Cut(kv, "=")
		pairs = append(pairs, k, v)
	}
	enc := json.NewEncoder(os.Stdout)
	for i := 0; *n == 0 || i < *n; i++ {
		if ctx.Err() != nil {
			return nil
		}
		if *reconnect && i > 0 {
			// The new channel opens before the old one closes, as in an
			// application that holds channels: gRPC keeps its xDS client
			// (and the resources it has) while some channel uses it.
			old := conn
			if conn, err = dial(); err != nil {
				return err
			}
			old.Close()
		}
		cctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, pairs...), *timeout)
		out := new(structpb.Struct)
		start := time.Now()
		err := conn.Invoke(cctx, "/echo.Echo/"+*rpc, wrapperspb.String(fmt.Sprintf("call %d", i)), out, grpc.WaitForReady(*wait))
		ms := float64(time.Since(start).Microseconds()) / 1000
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			_ = enc.Encode(map[string]any{"error": err.Error(), "code": status.Code(err).String(), "ms": ms, "at": start.UnixMilli()})
		} else {
			m := out.AsMap()
			m["ms"], m["at"] = ms, start.UnixMilli()
			_ = enc.Encode(m)
		}
		if *interval > 0 {
			time.Sleep(*interval)
		}
	}
	return nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
