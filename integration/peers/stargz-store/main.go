// Command stargz-store serves stargz-snapshotter's layer store (package store) over FUSE as a
// podman additional layer store, for lazyshim's benchmark and demo only.
//
// Why our own main: Debian ships the package sources (golang-github-containerd-stargz-snapshotter-dev)
// but not the stargz-store command, and the Makefile builds everything offline in GOPATH mode.
// Only what a loopback, credential-free registry needs is wired: a TOML config (fs/config plus the
// plain-HTTP registries), the in-memory metadata store and the mount. It exits cleanly (unmounting) on
// SIGINT or SIGTERM.
//
//	stargz-store -root DIR [-config FILE] [-log-level LEVEL] MOUNTPOINT
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"

	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/store"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
)

// storeConfig is the file format: the filesystem's own options (fs/config) at the top level, and the
// registries to reach over plain HTTP.
type storeConfig struct {
	config.Config
	PlainHTTP []string `toml:"plain_http_registries"`
}

// registryHosts reaches each registry directly: plain HTTP for loopback hosts and the configured
// ones, HTTPS otherwise, no credentials. (The package's own resolver also speaks CRI, whose API
// Debian does not package.)
func registryHosts(plainHTTP []string, timeout time.Duration) source.RegistryHosts {
	plain := map[string]bool{}
	for _, h := range plainHTTP {
		plain[h] = true
	}
	// One keep-alive pool for every layer. The fetcher uses Client.Transport directly: never nil.
	transport := http.DefaultTransport.(*http.Transport).Clone()
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		scheme := "https"
		if local, _ := docker.MatchLocalhost(host); local || plain[host] {
			scheme = "http"
		}
		client := &http.Client{Timeout: timeout, Transport: transport}
		return []docker.RegistryHost{{
			Client:       client,
			Host:         host,
			Scheme:       scheme,
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}}, nil
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "stargz-store: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	root := flag.String("root", "", "directory for the store's state and caches (required)")
	configPath := flag.String("config", "", "TOML configuration file (optional)")
	logLevel := flag.String("log-level", "warn", "logrus level")
	flag.Parse()
	mountpoint := flag.Arg(0)
	if *root == "" || mountpoint == "" || flag.NArg() != 1 {
		fail("usage: stargz-store -root DIR [-config FILE] [-log-level LEVEL] MOUNTPOINT")
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fail("bad -log-level: %v", err)
	}
	logrus.SetLevel(lvl)

	var cfg storeConfig
	if *configPath != "" {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			fail("config %s: %v", *configPath, err)
		}
		if err := tree.Unmarshal(&cfg); err != nil {
			fail("config %s: %v", *configPath, err)
		}
	}
	// The store package cannot verify layers against a manifest it did not resolve (upstream's
	// stargz-store makes the same switch): it serves the TOC's digests only.
	cfg.Config.DisableVerification = true

	for _, d := range []string{*root, mountpoint} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			fail("%v", err)
		}
	}
	ctx := context.Background()
	hosts := registryHosts(cfg.PlainHTTP, 30*time.Second)
	manager, err := store.NewLayerManager(ctx, *root, hosts, memorymetadata.NewReader, cfg.Config)
	if err != nil {
		fail("layer manager: %v", err)
	}
	if err := store.Mount(ctx, mountpoint, manager, cfg.Config.Debug); err != nil {
		fail("mount %s: %v", mountpoint, err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	if err := syscall.Unmount(mountpoint, 0); err != nil {
		fail("unmount %s: %v", mountpoint, err)
	}
}
