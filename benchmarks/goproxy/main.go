// The Go reference for the benchmark: net/http/httputil.ReverseProxy, as llama-swap relays.
//
//	goproxy LISTEN_PORT=BACKEND_URL [LISTEN_PORT=BACKEND_URL ...]
//
// One process listens on every LISTEN_PORT (127.0.0.1) and relays each request, as it is, to
// the backend paired with that port, like benchmarks/minimal_relay.py and the nginx target.
// Standard library only. As llama-swap does (it reads the body to find the model), the request
// body is read whole before it is forwarded; nginx (proxy_request_buffering) and the minimal
// relay do the same. Every write of an answer is flushed at once (FlushInterval -1), as
// server-sent events need; one keep-alive pool, sized for the benchmark's load, serves every
// backend. It prints "listening" when every port is bound.
package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"time"
)

// buffered reads the request body whole, then hands the request on. With the body streamed
// through instead, a backend that answers before it has read the body (the benchmark's nginx
// SSE backend does) races with the transport still sending it: the server side discards the
// unread body when the answer's header is written, the transport finds the body short and
// closes the backend connection in the middle of the answer ("use of closed network
// connection"; about 0.5% of SSE bursts cut short). Read first: none in 2,000. The buffer is
// allocated once, at the announced length (io.ReadAll's growing buffer tripled the proxy's
// CPU on 1 MiB bodies).
func buffered(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body []byte
		var err error
		if r.ContentLength >= 0 {
			body = make([]byte, r.ContentLength)
			_, err = io.ReadFull(r.Body, body)
		} else {
			body, err = io.ReadAll(r.Body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		next.ServeHTTP(w, r)
	})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goproxy LISTEN_PORT=BACKEND_URL [LISTEN_PORT=BACKEND_URL ...]")
		os.Exit(2)
	}
	transport := &http.Transport{
		Proxy: nil, // never through $HTTP_PROXY: the backends are on loopback
		DialContext: (&net.Dialer{
			Timeout:   30 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	errorLog := log.New(os.Stderr, "goproxy: ", log.LstdFlags)
	failed := make(chan error, len(os.Args))
	for _, pair := range os.Args[1:] {
		port, backend, ok := strings.Cut(pair, "=")
		if !ok {
			log.Fatalf("not LISTEN_PORT=BACKEND_URL: %q", pair)
		}
		target, err := url.Parse(backend)
		if err != nil {
			log.Fatalf("bad backend URL %q: %v", backend, err)
		}
		proxy := httputil.NewSingleHostReverseProxy(target)
		proxy.Transport = transport
		proxy.FlushInterval = -1
		proxy.ErrorLog = errorLog
		listener, err := net.Listen("tcp", "127.0.0.1:"+port)
		if err != nil {
			log.Fatalf("listen on %s: %v", port, err)
		}
		server := &http.Server{Handler: buffered(proxy), ErrorLog: errorLog}
		go func() { failed <- server.Serve(listener) }()
	}
	fmt.Println("listening")
	log.Fatal(<-failed)
}
