package main

// dsipam over grpc-go: one connection per plugin run, cleartext (unix socket or TCP) or TLS,
// with raw bytes in and out (wire.go encodes and decodes the few messages).

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const service = "/dsipam.v1.IpamService/"
const dialing = "Error while dialing "
const abortedRetries = 3
const maxResponse = 64 << 20

// rawCodec passes the request's and the response's bytes through; it is registered under the
// name "proto" so that the content-type stays application/grpc+proto's default.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// rpcError is a call that did not return OK: the status, its message and the ErrorInfo reason.
type rpcError struct {
	code    codes.Code
	message string
	reason  string
}

func (e *rpcError) Error() string { return codeName(e.code) + ": " + e.message }

var codeNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
	"UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(code codes.Code) string {
	if int(code) < len(codeNames) {
		return codeNames[code]
	}
	return fmt.Sprint(uint32(code))
}

type client struct {
	conn   *grpc.ClientConn
	ctx    context.Context
	cancel context.CancelFunc
	target string
}

func readPEM(path, field string) ([]byte, *cniError) {
	data, err := readLimited(path)
	if err != nil {
		return nil, bad(field, "cannot read "+pyRepr(path)+": "+strerror(err))
	}
	return data, nil
}

// connect opens the connection for a parsed configuration; its deadline covers every call.
func connect(cfg *ipamConfig) (*client, *cniError) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(cfg.timeout*float64(time.Second)))
	if cfg.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+cfg.token)
	}
	options := []grpc.DialOption{
		grpc.WithUserAgent("dsipam-cni"),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(maxResponse)),
	}
	target := cfg.target
	if strings.HasPrefix(target, "unix://") {
		path := target[len("unix://"):]
		target = "passthrough:///localhost"
		options = append(options, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	} else {
		target = "passthrough:///" + target
	}
	if cfg.tls != nil {
		conf := &tls.Config{ServerName: cfg.tls.ServerName, MinVersion: tls.VersionTLS12}
		if cfg.tls.CA != "" {
			pem, err := readPEM(cfg.tls.CA, "ipam.tls.ca")
			if err != nil {
				cancel()
				return nil, err
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				cancel()
				return nil, bad("ipam.tls.ca", pyRepr(cfg.tls.CA)+" holds no PEM certificate")
			}
			conf.RootCAs = pool
		}
		if cfg.tls.Cert != "" {
			certPEM, err := readPEM(cfg.tls.Cert, "ipam.tls.cert")
			if err != nil {
				cancel()
				return nil, err
			}
			keyPEM, err := readPEM(cfg.tls.Key, "ipam.tls.key")
			if err != nil {
				cancel()
				return nil, err
			}
			pair, perr := tls.X509KeyPair(certPEM, keyPEM)
			if perr != nil {
				cancel()
				return nil, bad("ipam.tls.cert", pyRepr(cfg.tls.Cert)+" and ipam.tls.key "+pyRepr(cfg.tls.Key)+
					" are not a PEM certificate and its key")
			}
			conf.Certificates = []tls.Certificate{pair}
		}
		options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	} else {
		options = append(options, grpc.WithInsecure())
	}
	conn, err := grpc.DialContext(ctx, target, options...)
	if err != nil {
		cancel()
		return nil, &cniError{code: tryAgainLater, msg: fmt.Sprintf("cannot reach %s: %v", cfg.endpoint, err)}
	}
	return &client{conn: conn, ctx: ctx, cancel: cancel, target: cfg.endpoint}, nil
}

func (c *client) close() {
	c.conn.Close()
	c.cancel()
}

// call makes one unary call, again while the server reports a lost race (ABORTED): every call
// the plugin makes is idempotent.
func (c *client) call(method string, request []byte) ([]byte, *rpcError) {
	for attempt := 0; ; attempt++ {
		var response []byte
		err := c.conn.Invoke(c.ctx, service+method, &request, &response)
		if err == nil {
			return response, nil
		}
		st := status.Convert(err)
		rerr := &rpcError{code: st.Code(), message: st.Message()}
		if st.Code() == codes.DeadlineExceeded && c.ctx.Err() != nil {
			rerr.message = "deadline exceeded talking to " + c.target
		}
		if i := strings.Index(rerr.message, dialing); st.Code() == codes.Unavailable && i >= 0 {
			// grpc-go's `connection error: desc = "transport: Error while dialing dial unix /x.sock:
			// connect: no such file or directory"`, said as the Python plugin says it.
			cause := strings.TrimSuffix(rerr.message[i+len(dialing):], `"`)
			if j := strings.Index(cause, ": "); strings.HasPrefix(cause, "dial ") && j >= 0 {
				cause = cause[j+2:]
			}
			rerr.message = "cannot connect to " + c.target + ": " + cause
		}
		for _, detail := range st.Proto().GetDetails() {
			if reason := errorInfoReason(detail.GetTypeUrl(), detail.GetValue()); reason != "" {
				rerr.reason = reason
				break
			}
		}
		if rerr.code != codes.Aborted || attempt == abortedRetries {
			return nil, rerr
		}
	}
}

// readLimited reads a file the configuration names (a token, a certificate): at most 1 MiB.
func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20+1)
	n := 0
	for n < len(buf) {
		m, err := f.Read(buf[n:])
		n += m
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	if n > 1<<20 {
		return nil, errTooLarge
	}
	return buf[:n], nil
}

var errTooLarge = errors.New("larger than 1 MiB")

// strerror is the C library's wording of an error, as Python's OSError.strerror gives it.
func strerror(err error) string {
	if err == errTooLarge {
		return err.Error()
	}
	if pe, ok := err.(*os.PathError); ok {
		err = pe.Err
	}
	text := err.Error()
	if text != "" {
		text = strings.ToUpper(text[:1]) + text[1:]
	}
	return text
}
