// Command p2p-kube is a Kubernetes cluster in one binary, built from upstream modules for the
// project's cluster and node test tiers (tests/cluster, tests/node): kube-apiserver,
// kube-controller-manager, kube-scheduler and etcd, and for the node kubelet and kube-proxy, chosen by
// the first argument as hyperkube once did. One binary links once, which on a two-core machine saves
// minutes against six.
package main

import (
	"context"
	"fmt"
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

const usage = "usage: p2p-kube kube-apiserver|kube-controller-manager|kube-scheduler|etcd|kubelet|kube-proxy [flags]"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	name, rest := os.Args[1], os.Args[2:]
	switch name {
	case "etcd":
		etcdmain.Main(append([]string{"etcd"}, rest...))
		return
	case "kube-apiserver":
		os.Args = append([]string{name}, rest...)
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Args = append([]string{name}, rest...)
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Args = append([]string{name}, rest...)
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubelet":
		os.Args = append([]string{name}, rest...)
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kube-proxy":
		os.Args = append([]string{name}, rest...)
		os.Exit(cli.Run(proxy.NewProxyCommand()))
	default:
		fmt.Fprintf(os.Stderr, "p2p-kube: unknown component %q\n%s\n", name, usage)
		os.Exit(2)
	}
}
