// Command load is the client side of goml's etcd benchmark (bench/peers.py): etcd's own Go
// client (clientv3), one gRPC connection per member, so the figures are etcd's and not a
// slow client's. It serves the same line protocol as bench/hashiraft on -control, one JSON
// line back per request line:
//
//	status                               every member's Status (id, leader, term, index)
//	write I                              one Put through member I
//	bench I CONCURRENCY SECONDS COUNT    through member I (the leader): CONCURRENCY Puts in
//	                                     flight for SECONDS, then COUNT sequential Puts
//
// Each Put writes a fixed key with a -payload-bytes value.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

const (
	putTimeout      = 5 * time.Second
	writeTimeout    = 2 * time.Second
	statusTimeout   = 500 * time.Millisecond
	controlLineMax  = 256
	benchSecondsMax = 600
	concurrencyMax  = 4096
	latencyCountMax = 100_000
	key             = "bench"
)

type loader struct {
	endpoints []string
	clients   []*clientv3.Client
	value     string
}

func main() {
	endpoints := flag.String("endpoints", "", "member client URLs, comma-separated (http:// or https://)")
	control := flag.String("control", "", "HOST:PORT for the benchmark line protocol")
	cacert := flag.String("cacert", "", "CA bundle (TLS)")
	cert := flag.String("cert", "", "client certificate (TLS)")
	keyFile := flag.String("key", "", "client key (TLS)")
	payloadBytes := flag.Int("payload-bytes", 64, "bytes per Put value")
	flag.Parse()
	if *endpoints == "" || *control == "" {
		log.Fatal("-endpoints and -control are required")
	}
	if *payloadBytes < 1 || *payloadBytes > 1<<20 {
		log.Fatalf("-payload-bytes %d out of range", *payloadBytes)
	}
	var tlsConfig *tls.Config
	if *cacert != "" {
		info := transport.TLSInfo{TrustedCAFile: *cacert, CertFile: *cert, KeyFile: *keyFile}
		var err error
		if tlsConfig, err = info.ClientConfig(); err != nil {
			log.Fatal(err)
		}
	}
	l := &loader{value: strings.Repeat("x", *payloadBytes)}
	for _, endpoint := range strings.Split(*endpoints, ",") {
		client, err := clientv3.New(clientv3.Config{
			Endpoints:   []string{endpoint},
			DialTimeout: 2 * time.Second,
			TLS:         tlsConfig,
			Logger:      zap.NewNop(),
		})
		if err != nil {
			log.Fatal(err)
		}
		defer client.Close()
		l.endpoints = append(l.endpoints, endpoint)
		l.clients = append(l.clients, client)
	}
	listener, err := net.Listen("tcp", *control)
	if err != nil {
		log.Fatal(err)
	}
	go l.serve(listener)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	listener.Close()
}

func (l *loader) serve(listener net.Listener) {
	for {
		conn, err := listener.Accept()
		if err != nil {
			return // closed on shutdown
		}
		go l.handle(conn)
	}
}

func (l *loader) handle(conn net.Conn) {
	defer conn.Close()
	scanner := bufio.NewScanner(conn)
	scanner.Buffer(make([]byte, controlLineMax), controlLineMax)
	encoder := json.NewEncoder(conn)
	for scanner.Scan() {
		if err := encoder.Encode(l.request(strings.Fields(scanner.Text()))); err != nil {
			return
		}
	}
}

func fail(err error) map[string]interface{} {
	return map[string]interface{}{"ok": false, "error": err.Error()}
}

func (l *loader) member(word string) (*clientv3.Client, error) {
	i, err := strconv.Atoi(word)
	if err != nil {
		return nil, err
	}
	if i < 0 || i >= len(l.clients) {
		return nil, fmt.Errorf("member %d out of range", i)
	}
	return l.clients[i], nil
}

func (l *loader) request(words []string) map[string]interface{} {
	if len(words) == 0 {
		return fail(errors.New("empty request"))
	}
	switch {
	case words[0] == "status" && len(words) == 1:
		return l.status()
	case words[0] == "write" && len(words) == 2:
		client, err := l.member(words[1])
		if err != nil {
			return fail(err)
		}
		started := time.Now()
		if err := l.put(client, writeTimeout); err != nil {
			return fail(err)
		}
		return map[string]interface{}{"ok": true, "ms": ms(time.Since(started))}
	case words[0] == "bench" && len(words) == 5:
		client, err0 := l.member(words[1])
		concurrency, err1 := strconv.Atoi(words[2])
		seconds, err2 := strconv.ParseFloat(words[3], 64)
		count, err3 := strconv.Atoi(words[4])
		if err := errors.Join(err0, err1, err2, err3); err != nil {
			return fail(err)
		}
		if concurrency < 1 || concurrency > concurrencyMax || seconds <= 0 ||
			seconds > benchSecondsMax || count < 1 || count > latencyCountMax {
			return fail(errors.New("bench arguments out of range"))
		}
		return l.bench(client, concurrency, time.Duration(seconds*float64(time.Second)), count)
	}
	return fail(fmt.Errorf("unknown request %q", words))
}

func (l *loader) put(client *clientv3.Client, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := client.Put(ctx, key, l.value)
	return err
}

func (l *loader) status() map[string]interface{} {
	members := make([]map[string]interface{}, len(l.clients))
	var wg sync.WaitGroup
	for i, client := range l.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
			defer cancel()
			status, err := client.Status(ctx, l.endpoints[i])
			if err != nil {
				members[i] = map[string]interface{}{"ok": false, "error": err.Error()}
				return
			}
			members[i] = map[string]interface{}{
				"ok":         true,
				"id":         fmt.Sprintf("%x", status.Header.MemberId),
				"leader":     fmt.Sprintf("%x", status.Leader),
				"term":       status.RaftTerm,
				"index":      status.RaftIndex,
				"applied":    status.RaftAppliedIndex,
				"db_size":    status.DbSize,
				"is_learner": status.IsLearner,
			}
		}()
	}
	wg.Wait()
	return map[string]interface{}{"ok": true, "members": members}
}

func (l *loader) bench(client *clientv3.Client, concurrency int, duration time.Duration, count int) map[string]interface{} {
	// One Put first: the connection is up and the leader has committed in its term.
	if err := l.put(client, putTimeout); err != nil {
		return fail(err)
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
				if err := l.put(client, putTimeout); err != nil {
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
		if err := l.put(client, putTimeout); err != nil {
			return fail(err)
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
