package kubenode

import (
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/sluice-dev/sluice/internal/agentproc"
	"github.com/sluice-dev/sluice/internal/netlab"
)

// Forwarder carries TCP connections accepted inside a namespace to an address of the calling
// process's own namespace.
type Forwarder struct {
	ln net.Listener
	wg sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// Forward listens on addr (host:port) inside the namespace of h and carries each connection,
// byte for byte, to the same addr as this process sees it. A node component in a lab namespace,
// whose 127.0.0.1 is its own, reaches a test API server on the machine's loopback this way with
// the kubeconfig and certificates unchanged, and nothing is routed between the namespaces.
func Forward(h *netlab.Host, addr string) (*Forwarder, error) {
	var ln net.Listener
	if err := h.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		return nil, err
	}
	f := &Forwarder{ln: ln, conns: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go f.serve(addr)
	return f, nil
}

func (f *Forwarder) serve(target string) {
	defer f.wg.Done()
	for {
		in, err := f.ln.Accept()
		if err != nil {
			return
		}
		// This goroutine is not locked to the namespace's thread: it dials from ours.
		out, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			in.Close()
			continue
		}
		f.track(in, out)
		f.wg.Add(2)
		go f.pipe(in, out)
		go f.pipe(out, in)
	}
}

func (f *Forwarder) track(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
}

func (f *Forwarder) pipe(dst, src net.Conn) {
	defer f.wg.Done()
	io.Copy(dst, src)
	dst.Close()
	src.Close()
	f.mu.Lock()
	delete(f.conns, dst)
	delete(f.conns, src)
	f.mu.Unlock()
}

// Close stops listening, cuts every carried connection and waits for the copies to end.
func (f *Forwarder) Close() error {
	err := f.ln.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
	return err
}

// GetOK reports whether GET url from inside the namespace of h answers 200.
func GetOK(h *netlab.Host, url string) bool {
	c := agentproc.HTTPClient(h.Do, time.Second)
	defer c.CloseIdleConnections()
	resp, err := c.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
