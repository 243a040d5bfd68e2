// Command hashiraft is one hashicorp/raft node as a process, the peer in goml's
// `nox -s bench` (bench/peers.py): TCP transport, raft-boltdb/v2 for the log and stable
// store (fsync on every append, bbolt's default), a file snapshot store and a trivial FSM
// that counts what it applies.
//
// The node serves a line protocol on -control for the benchmark harness, one JSON line
// back per request line:
//
//	status                          role, leader, term, indexes
//	write                           Apply one payload on this node (fails fast unless leader)
//	bench CONCURRENCY SECONDS COUNT  in the leader process: CONCURRENCY Applies in flight for
//	                                SECONDS, then COUNT sequential Applies on the idle leader
//
// The load runs in the leader process, as goml's goml/raft/node_main.py does, so neither
// figure includes a client protocol. SIGTERM or SIGINT shuts the node down cleanly.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

const (
	applyTimeout     = 5 * time.Second
	controlLineMax   = 256
	benchSecondsMax  = 600
	concurrencyMax   = 4096
	latencyCountMax  = 100_000
	transportPoolMax = 3
)

// counter is the trivial state machine: the number of entries applied.
type counter struct {
	applied atomic.Uint64
}

func (c *counter) Apply(entry *raft.Log) interface{} {
	return c.applied.Add(1)
}

func (c *counter) Snapshot() (raft.FSMSnapshot, error) {
	return &counterSnapshot{value: c.applied.Load()}, nil
}

func (c *counter) Restore(snapshot io.ReadCloser) error {
	defer snapshot.Close()
	var buf [8]byte
	if _, err := io.ReadFull(snapshot, buf[:]); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	c.applied.Store(binary.BigEndian.Uint64(buf[:]))
	return nil
}

type counterSnapshot struct{ value uint64 }

func (s *counterSnapshot) Persist(sink raft.SnapshotSink) error {
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], s.value)
	if _, err := sink.Write(buf[:]); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *counterSnapshot) Release() {}

type node struct {
	id      string
	raft    *raft.Raft
	payload []byte
}

type peer struct {
	id      raft.ServerID
	address raft.ServerAddress
}

func parsePeers(text string) ([]peer, error) {
	var peers []peer
	for _, item := range strings.Split(text, ",") {
		id, address, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok || id == "" || address == "" {
			return nil, fmt.Errorf("bad peer %q: expected ID=HOST:PORT", item)
		}
		peers = append(peers, peer{raft.ServerID(id), raft.ServerAddress(address)})
	}
	return peers, nil
}

func main() {
	id := flag.String("id", "", "this node's id (one of -peers)")
	peersFlag := flag.String("peers", "", "every voter: n1=HOST:PORT,n2=HOST:PORT,... (Raft TCP addresses)")
	control := flag.String("control", "", "HOST:PORT for the benchmark line protocol")
	dataDir := flag.String("data", "", "data directory (bolt log, snapshots)")
	heartbeat := flag.Duration("heartbeat-timeout", 300*time.Millisecond, "raft.Config.HeartbeatTimeout")
	election := flag.Duration("election-timeout", 300*time.Millisecond, "raft.Config.ElectionTimeout")
	lease := flag.Duration("leader-lease-timeout", 300*time.Millisecond, "raft.Config.LeaderLeaseTimeout")
	commit := flag.Duration("commit-timeout", 50*time.Millisecond, "raft.Config.CommitTimeout")
	payloadBytes := flag.Int("payload-bytes", 64, "bytes per write")
	logLevel := flag.String("log-level", "warn", "hclog level")
	flag.Parse()
	if *id == "" || *peersFlag == "" || *control == "" || *dataDir == "" {
		log.Fatal("-id, -peers, -control and -data are required")
	}
	peers, err := parsePeers(*peersFlag)
	if err != nil {
		log.Fatal(err)
	}
	var self *peer
	for i := range peers {
		if string(peers[i].id) == *id {
			self = &peers[i]
		}
	}
	if self == nil {
		log.Fatalf("-id %s is not in -peers", *id)
	}
	if *payloadBytes < 1 || *payloadBytes > 1<<20 {
		log.Fatalf("-payload-bytes %d out of range", *payloadBytes)
	}
	if err := os.MkdirAll(*dataDir, 0o755); err != nil {
		log.Fatal(err)
	}

	logger := hclog.New(&hclog.LoggerOptions{
		Name:   "raft-" + *id,
		Level:  hclog.LevelFromString(*logLevel),
		Output: os.Stderr,
	})
	config := raft.DefaultConfig()
	config.LocalID = self.id
	config.HeartbeatTimeout = *heartbeat
	config.ElectionTimeout = *election
	config.LeaderLeaseTimeout = *lease
	config.CommitTimeout = *commit
	config.Logger = logger
	if err := raft.ValidateConfig(config); err != nil {
		log.Fatal(err)
	}

	// bbolt fsyncs every commit unless NoSync is set; raft-boltdb leaves it unset.
	store, err := raftboltdb.NewBoltStore(filepath.Join(*dataDir, "raft.db"))
	if err != nil {
		log.Fatal(err)
	}
	snapshots, err := raft.NewFileSnapshotStoreWithLogger(*dataDir, 2, logger)
	if err != nil {
		log.Fatal(err)
	}
	transport, err := raft.NewTCPTransportWithLogger(string(self.address), nil, transportPoolMax, 10*time.Second, logger)
	if err != nil {
		log.Fatal(err)
	}
	existing, err := raft.HasExistingState(store, store, snapshots)
	if err != nil {
		log.Fatal(err)
	}
	fsm := &counter{}
	r, err := raft.NewRaft(config, fsm, store, store, snapshots, transport)
	if err != nil {
		log.Fatal(err)
	}
	if !existing {
		servers := make([]raft.Server, 0, len(peers))
		for _, p := range peers {
			servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: p.id, Address: p.address})
		}
		// Every node bootstraps with the same configuration: hashicorp/raft documents that as safe.
		if err := r.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil &&
			!errors.Is(err, raft.ErrCantBootstrap) {
			log.Fatal(err)
		}
	}

	n := &node{id: *id, raft: r, payload: make([]byte, *payloadBytes)}
	listener, err := net.Listen("tcp", *control)
	if err != nil {
		log.Fatal(err)
	}
	go n.serve(listener)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	listener.Close()
	if err := r.Shutdown().Error(); err != nil {
		logger.Error("shutdown", "error", err)
	}
	if err := store.Close(); err != nil {
		logger.Error("close store", "error", err)
	}
}

func (n *node) serve(listener net.Listener) {
	for {
		conn, err := listener.Accept()
		if err != nil {
			return // closed on shutdown
		}
		go n.handle(conn)
	}
}

func (n *node) handle(conn net.Conn) {
	defer conn.Close()
	scanner := bufio.NewScanner(conn)
	scanner.Buffer(make([]byte, controlLineMax), controlLineMax)
	encoder := json.NewEncoder(conn)
	for scanner.Scan() {
		reply := n.request(strings.Fields(scanner.Text()))
		if err := encoder.Encode(reply); err != nil {
			return
		}
	}
}

func (n *node) request(words []string) map[string]interface{} {
	if len(words) == 0 {
		return map[string]interface{}{"ok": false, "error": "empty request"}
	}
	switch {
	case words[0] == "status" && len(words) == 1:
		return n.status()
	case words[0] == "write" && len(words) == 1:
		started := time.Now()
		if err := n.raft.Apply(n.payload, applyTimeout).Error(); err != nil {
			return map[string]interface{}{"ok": false, "error": err.Error()}
		}
		return map[string]interface{}{"ok": true, "ms": ms(time.Since(started))}
	case words[0] == "bench" && len(words) == 4:
		concurrency, err1 := strconv.Atoi(words[1])
		seconds, err2 := strconv.ParseFloat(words[2], 64)
		count, err3 := strconv.Atoi(words[3])
		if err := errors.Join(err1, err2, err3); err != nil {
			return map[string]interface{}{"ok": false, "error": err.Error()}
		}
		if concurrency < 1 || concurrency > concurrencyMax || seconds <= 0 ||
			seconds > benchSecondsMax || count < 1 || count > latencyCountMax {
			return map[string]interface{}{"ok": false, "error": "bench arguments out of range"}
		}
		return n.bench(concurrency, time.Duration(seconds*float64(time.Second)), count)
	}
	return map[string]interface{}{"ok": false, "error": fmt.Sprintf("unknown request %q", words)}
}

func (n *node) status() map[string]interface{} {
	stats := n.raft.Stats()
	_, leader := n.raft.LeaderWithID()
	term, _ := strconv.ParseUint(stats["term"], 10, 64)
	commit, _ := strconv.ParseUint(stats["commit_index"], 10, 64)
	return map[string]interface{}{
		"ok":         true,
		"id":         n.id,
		"pid":        os.Getpid(),
		"role":       strings.ToLower(n.raft.State().String()),
		"leader":     string(leader),
		"term":       term,
		"commit":     commit,
		"applied":    n.raft.AppliedIndex(),
		"last_index": n.raft.LastIndex(),
	}
}

func (n *node) bench(concurrency int, duration time.Duration, count int) map[string]interface{} {
	if n.raft.State() != raft.Leader {
		return map[string]interface{}{"ok": false, "error": "not the leader"}
	}
	// Let the election's no-op (and anything before) apply first, as goml's read_index does.
	if err := n.raft.Barrier(applyTimeout).Error(); err != nil {
		return map[string]interface{}{"ok": false, "error": err.Error()}
	}
	var committed, failed atomic.Int64
	var wg sync.WaitGroup
	started := time.Now()
	stopAt := started.Add(duration)
	for i := 0; i < concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stopAt) {
				if err := n.raft.Apply(n.payload, applyTimeout).Error(); err != nil {
					failed.Add(1)
				} else {
					committed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(started)
	latencies := make([]float64, 0, count)
	for i := 0; i < count; i++ {
		t := time.Now()
		if err := n.raft.Apply(n.payload, applyTimeout).Error(); err != nil {
			return map[string]interface{}{"ok": false, "error": err.Error()}
		}
		latencies = append(latencies, ms(time.Since(t)))
	}
	sort.Float64s(latencies)
	return map[string]interface{}{
		"ok":             true,
		"committed":      committed.Load(),
		"errors":         failed.Load(),
		"seconds":        elapsed.Seconds(),
		"commits_per_s":  float64(committed.Load()) / elapsed.Seconds(),
		"latency_ms_p50": latencies[len(latencies)/2],
		"latency_ms_p99": latencies[len(latencies)*99/100],
	}
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }
