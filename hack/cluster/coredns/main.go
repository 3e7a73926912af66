// Command coredns is CoreDNS (github.com/coredns/coredns) with only the plugins a cluster's DNS
// needs, for the node test tier (tests/node): the kubernetes plugin answers Services' and Pods' names
// from the API server, as a cluster's kube-dns does. Upstream's own main imports every plugin (cloud
// DNS back ends among them); listing the few here keeps the build to what runs.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins see a query in (a subset of upstream's plugin.cfg, in its order).
var directives = []string{"bind", "errors", "log", "health", "ready", "cache", "kubernetes"}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
