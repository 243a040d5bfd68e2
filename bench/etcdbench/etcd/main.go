// Command etcd is etcd v3.7.3's server, built inside goml's own module: `go install
// go.etcd.io/etcd/server/v3@...` fails on the replace directives in etcd's go.mod, which
// are ignored when etcd's modules are dependencies, as here. The root module's main.go does
// the same call.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
