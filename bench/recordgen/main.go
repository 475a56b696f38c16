// bkce-recordgen fills a real buildkitd with cache records, for the big-cache benchmark
// (bench/bigcache_bench.py) and for the test of answers past BuildKit's gRPC limit
// (tests/integration/test_big_cache.py).
//
// It is a client of BuildKit's own Go API, built from the BuildKit source archive beside the
// project (scripts/build-buildkit-small builds it with the buildkitd and buildctl of that test): a
// build whose frontend function solves `records/chain` LLB chains, each `chain` FileOps deep (every
// FileOp writes one small file of its own on top of the previous one). Each FileOp is one cache
// record, of type regular, with the one before it as its parent: a layered cache, as image builds
// make. Nothing is exported, so every record is reclaimable once the build ends.
//
//	bkce-recordgen --addr unix:///run/buildkit/buildkitd.sock --records 200000 [--chain 8]
//	               [--bytes 64] [--parallel 8] [--seed s]
//	bkce-recordgen --docker unix:///var/run/docker.sock ...   (dockerd's embedded BuildKit)
//	bkce-recordgen --addr ... --du-every 15s                 (the at-rest benchmark's peer)
//
// With --du-every it makes no records: it asks buildkitd's DiskUsage (every record, as
// `buildctl du` does) once per interval until it is stopped, from one long-lived process over one
// connection. That is what a peer exporter that asks BuildKit on every scrape costs a build host,
// for bench/rest_bench.py to measure beside ours.
//
// With --docker it reaches dockerd's own BuildKit the way buildx's docker driver does: gRPC over the
// Engine API's `POST /grpc`, upgraded to h2c.
//
// The seed goes into every file, so two runs with different seeds make different records (the
// same seed twice only uses the first run's records again, raising their usage counts).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/moby/buildkit/client"
	"github.com/moby/buildkit/client/llb"
	gateway "github.com/moby/buildkit/frontend/gateway/client"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

func main() {
	addr := flag.String("addr", "unix:///run/buildkit/buildkitd.sock", "buildkitd address")
	records := flag.Int("records", 1000, "cache records to make")
	chain := flag.Int("chain", 8, "records per chain (each the parent of the next)")
	size := flag.Int("bytes", 64, "bytes written by each record")
	parallel := flag.Int("parallel", 8, "chains solved at once")
	seed := flag.String("seed", fmt.Sprint(time.Now().UnixNano()), "makes this run's records its own")
	docker := flag.String("docker", "", "a Docker Engine's unix:// socket: its embedded BuildKit instead of --addr")
	duEvery := flag.Duration("du-every", 0, "make no records: ask DiskUsage at this interval until stopped")
	flag.Parse()
	if *records < 1 || *chain < 1 || *parallel < 1 {
		fmt.Fprintln(os.Stderr, "bkce-recordgen: --records, --chain and --parallel must be at least 1")
		os.Exit(2)
	}

	ctx := context.Background()
	// This client's own messages are small (one chain a solve); a buildkitd built with a small
	// gRPC limit still takes them. Large limits here so that only the server's limit applies.
	opts := []client.ClientOpt{client.WithGRPCDialOption(grpc.WithDefaultCallOptions(
		grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))}
	if *docker != "" {
		socket := strings.TrimPrefix(*docker, "unix://")
		opts = append(opts, client.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return dialGRPC(ctx, socket)
		}))
		*addr = ""
	}
	c, err := client.New(ctx, *addr, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bkce-recordgen:", err)
		os.Exit(1)
	}
	defer c.Close()

	if *duEvery > 0 {
		for {
			if _, err := c.DiskUsage(ctx); err != nil {
				fmt.Fprintln(os.Stderr, "bkce-recordgen: DiskUsage:", err)
			}
			time.Sleep(*duEvery)
		}
	}

	chains := (*records + *chain - 1) / *chain
	var made atomic.Int64
	started := time.Now()
	build := func(ctx context.Context, gw gateway.Client) (*gateway.Result, error) {
		eg, ctx := errgroup.WithContext(ctx)
		eg.SetLimit(*parallel)
		var mu sync.Mutex
		last := time.Now()
		for i := 0; i < chains; i++ {
			eg.Go(func() error {
				st := llb.Scratch()
				n := *chain
				if left := *records - i**chain; left < n {
					n = left
				}
				for j := 0; j < n; j++ {
					body := make([]byte, *size)
					copy(body, fmt.Sprintf("%s/%d/%d\n", *seed, i, j))
					st = st.File(llb.Mkfile(fmt.Sprintf("/r%d", j), 0o644, body), llb.WithCustomNamef("record %d/%d", i, j))
				}
				def, err := st.Marshal(ctx)
				if err != nil {
					return err
				}
				res, err := gw.Solve(ctx, gateway.SolveRequest{Definition: def.ToPB(), Evaluate: true})
				if err != nil {
					return err
				}
				if ref, err := res.SingleRef(); err == nil && ref != nil {
					_ = ref.Evaluate(ctx)
				}
				total := made.Add(int64(n))
				mu.Lock()
				if time.Since(last) > 5*time.Second {
					last = time.Now()
					fmt.Fprintf(os.Stderr, "bkce-recordgen: %d of %d records, %.0f/s\n", total, *records,
						float64(total)/time.Since(started).Seconds())
				}
				mu.Unlock()
				return nil
			})
		}
		if err := eg.Wait(); err != nil {
			return nil, err
		}
		return gateway.NewResult(), nil
	}
	if _, err := c.Build(ctx, client.SolveOpt{}, "bkce-recordgen", build, nil); err != nil {
		fmt.Fprintln(os.Stderr, "bkce-recordgen:", err)
		os.Exit(1)
	}
	fmt.Printf("%d records in %d chains of %d in %.1fs\n", made.Load(), chains, *chain, time.Since(started).Seconds())
}

// dialGRPC opens dockerd's BuildKit endpoint: `POST /grpc` upgraded to h2c on the Engine API socket.
func dialGRPC(ctx context.Context, socket string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	req, _ := http.NewRequest(http.MethodPost, "http://docker/grpc", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "h2c")
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("POST /grpc: %s", resp.Status)
	}
	return &bufferedConn{Conn: conn, r: br}, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
