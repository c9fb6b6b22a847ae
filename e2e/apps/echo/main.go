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
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const method = "/echo.Echo/Echo"

type echoServer interface {
	Echo(context.Context, *wrapperspb.StringValue) (*structpb.Struct, error)
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: "echo.Echo",
	HandlerType: (*echoServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.StringValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			return srv.(echoServer).Echo(ctx, in)
		},
	}},
}

type server struct{ pod string }

func (s *server) Echo(ctx context.Context, in *wrapperspb.StringValue) (*structpb.Struct, error) {
	out := map[string]any{"pod": s.pod, "message": in.GetValue(), "peer": "", "spiffeID": ""}
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
		fmt.Fprintln(os.Stderr, "usage: echo server|client [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = serve(os.Args[2:])
	case "client":
		err = call(os.Args[2:])
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
	g.RegisterService(&serviceDesc, &server{pod: *pod})
	fmt.Printf("LISTENING %s\n", lis.Addr())
	go func() { <-ctx.Done(); g.GracefulStop() }()
	return g.Serve(lis)
}

// call makes n calls and prints one JSON line per call: the response, or
// {"error": ..., "code": ...}.
func call(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	target := fs.String("target", "", "e.g. xds:///echo.default.svc.cluster.local:50051")
	n := fs.Int("n", 1, "number of calls")
	interval := fs.Duration("interval", 0, "pause between calls")
	timeout := fs.Duration("timeout", 10*time.Second, "per-call timeout")
	wait := fs.Bool("wait-for-ready", true, "wait for the channel to be ready (xDS resources and endpoints) instead of failing fast")
	_ = fs.Parse(args)
	var creds credentials.TransportCredentials = insecure.NewCredentials()
	if useXDS() {
		var err error
		if creds, err = xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()}); err != nil {
			return err
		}
	}
	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	enc := json.NewEncoder(os.Stdout)
	for i := range *n {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		out := new(structpb.Struct)
		err := conn.Invoke(ctx, method, wrapperspb.String(fmt.Sprintf("call %d", i)), out, grpc.WaitForReady(*wait))
		cancel()
		if err != nil {
			_ = enc.Encode(map[string]any{"error": err.Error(), "code": status.Code(err).String()})
		} else {
			_ = enc.Encode(out.AsMap())
		}
		if *interval > 0 {
			time.Sleep(*interval)
		}
	}
	return nil
}
