//! `run`: the proxy's start-up and shutdown order, and the `rules`
//! subcommand; both choose the discovery source the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Health, RulesState};
use crate::cli::RunArgs;
use crate::discovery::{self, manifests};
use crate::handover;
use crate::iptables::{self, Iptables};
use crate::model::Snapshot;
use crate::proxy::{Keepalive, Proxier, ProxyConfig};
use crate::runloop::{Loop, RuleSync};
use crate::{metrics, privileges, raise_fd_limit, shutdown_signal, ConfigError};

/// Where snapshots come from, as the flags and environment choose.
enum Source {
    /// `--manifests DIR`, or the embedded examples, with this node's options.
    Manifests(manifests::Source, discovery::Options),
    /// The Kubernetes API, with this node's options.
    Kube(Box<::kube::Client>, discovery::Options),
}

/// `--manifests` wins; else the API when a kubeconfig, `--master` or
/// in-cluster configuration is there; else the embedded manifests.
async fn discovery_source(args: &RunArgs) -> Result<Source, ConfigError> {
    match &args.manifests {
        Some(dir) if !dir.is_dir() => Err(ConfigError(format!(
            "--manifests {}: not a directory",
            dir.display()
        ))),
        Some(dir) => Ok(Source::Manifests(
            manifests::Source::Dir(dir.clone()),
            discovery_options(args),
        )),
        None if discovery::kube::configured(args.kubeconfig.as_deref(), args.master.as_deref()) => {
            let config =
                discovery::kube::config(args.kubeconfig.as_deref(), args.master.as_deref())
                    .await
                    .map_err(|e| ConfigError(e.to_string()))?;
            tracing::info!(server = %config.cluster_url, "Kubernetes discovery");
            let client = discovery::kube::client(config).map_err(|e| ConfigError(e.to_string()))?;
            Ok(Source::Kube(Box::new(client), discovery_options(args)))
        }
        None => Ok(Source::Manifests(
            manifests::Source::Embedded,
            discovery_options(args),
        )),
    }
}

/// Node name and proxy name, as kube-proxy takes them: `--hostname-override`
/// or the hostname, lower-cased. Both sources use them: the node name
/// picks this node's Node (labels, pod CIDRs) and its endpoints.
fn discovery_options(args: &RunArgs) -> discovery::Options {
    let node_name = args
        .hostname_override
        .clone()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty());
    if node_name.is_none() {
        tracing::warn!(
            "no node name (--hostname-override): traffic policy Local keeps all endpoints"
        );
    }
    discovery::Options {
        node_name,
        service_proxy_name: args.service_proxy_name.clone(),
    }
}

fn proxy_config(args: &RunArgs, fd_limit: u64) -> ProxyConfig {
    ProxyConfig {
        bind_address: args.bind_address,
        port_range: args.proxy_port_range,
        dial_timeouts: args.dial_timeouts.0.clone(),
        copy_mode: args.copy_mode,
        udp_timeout: args.udp_timeout,
        udp_max_sessions: args.udp_max_sessions,
        max_connections: args.max_connections,
        fd_limit: usize::try_from(fd_limit).unwrap_or(usize::MAX),
        reserved_fds: admin::RESERVED_FDS as usize,
        tcp_fin_timeout: args.tcp_fin_timeout,
        tcp_keepalive: (!args.tcp_keepalive_time.is_zero()).then_some(Keepalive {
            time: args.tcp_keepalive_time,
            interval: args.tcp_keepalive_interval,
            probes: args.tcp_keepalive_probes,
        }),
        scheduler: args.scheduler,
        workers: args
            .worker_threads
            .map_or_else(crate::proxy::workers::default_count, usize::from),
        worker_idle: args.worker_idle,
        detect_local: args.detect_local(),
    }
}

/// Runs the proxy until SIGTERM/SIGINT: listeners close, rules are removed,
/// open connections drain for `--shutdown-grace`; a second signal exits at
/// once. With `--cleanup`, only removes rules.
pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // Both families by default, as a cluster's service proxy must.
    args.bind_address = crate::proxy::listener::listen_address(args.bind_address);
    if !nix::unistd::geteuid().is_root() {
        let passed = privileges::pass_to_children();
        tracing::info!(uid = %nix::unistd::geteuid(), capabilities = ?passed, "not root: capabilities passed on to iptables");
    }
    if args.cleanup {
        iptables::cleanup_all(args.iptables_backend).await?;
        tracing::info!("--cleanup: iptables chains and jumps of kube-userspace-proxy removed");
        return Ok(());
    }
    let source = discovery_source(&args).await?;
    let fd_limit = match raise_fd_limit() {
        Ok(n) => {
            tracing::info!(limit = n, "RLIMIT_NOFILE raised to the hard limit");
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft)
        }
    };
    let config = proxy_config(&args, fd_limit);
    config.detect_local.validate().map_err(ConfigError)?;
    let budget = config.fd_budget().map_err(|e| ConfigError(e.to_string()))?;
    match (config.max_connections, budget.connection_limit()) {
        (Some(0), _) => tracing::info!("--max-connections 0: no connection limit"),
        (Some(n), _) => tracing::info!(max_connections = n, "connection limit"),
        (None, n) => tracing::info!(
            fd_limit,
            fixed = budget.fixed(),
            max_connections = n,
            "connection limit: what the fd limit leaves, lowered as Service ports need listeners"
        ),
    }
    if matches!(source, Source::Manifests(manifests::Source::Embedded, _)) {
        tracing::info!("no --manifests and no cluster: serving the embedded example manifests");
    }
    // Before binding anything: a running predecessor hands its listeners over.
    let handover_path =
        (!args.handover_socket.as_os_str().is_empty()).then(|| args.handover_socket.clone());
    let started = std::time::Instant::now();
    let mut takeover = match handover_path.clone() {
        None => None,
        Some(path) => {
            match tokio::task::spawn_blocking(move || handover::take_over(&path)).await? {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "hand-over from the running proxy failed: it keeps serving; exiting without binding anything");
                    return Err(anyhow::anyhow!("hand-over failed: {e}"));
                }
            }
        }
    };
    let mut inherited = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.inherited))
        .unwrap_or_default();
    if let Some(t) = &takeover {
        tracing::info!(
            old_pid = t.old_pid,
            service_ports = inherited.len(),
            admin = inherited.admin.len(),
            "hand-over: listeners received"
        );
        // Fault tests kill either process here, between receiving the
        // listeners and serving them.
        if let Some(ms) = std::env::var(handover::TEST_STALL_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            tracing::warn!(
                ms,
                "{} set: stalling the hand-over",
                handover::TEST_STALL_ENV
            );
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    let handle = metrics::install();
    let health = Arc::new(Health::new(args.iptables_sync_period));
    let rules = Iptables::setup(args.iptables, args.iptables_backend, args.bind_address)
        .await
        .map_err(|e| ConfigError(format!("--iptables on: {e}")))?
        .map(|iptables| RuleSync {
            iptables,
            min_period: args.iptables_min_sync_period,
            period: args.iptables_sync_period,
            node_port_addresses: args.nodeport_addresses.clone(),
        });
    if rules.is_none() && !args.nodeport_addresses.0.is_empty() {
        tracing::warn!(
            addresses = %args.nodeport_addresses.0.join(","),
            "--nodeport-addresses is enforced by the iptables rules; with --iptables off, nodePorts answer on every address of --bind-address"
        );
    }
    if rules.is_some() {
        health.set_rules(RulesState::Pending);
    }
    let mut proxier = Proxier::with_fds(config, budget);
    proxier.adopt(&mut inherited);
    let service_health = admin::service_health::Server::new(
        args.bind_address,
        Arc::clone(&proxier.context().fds),
        Arc::clone(&health),
        std::mem::take(&mut inherited.health_checks),
    );
    let stop_admin = CancellationToken::new();
    let state = AdminState {
        handle,
        services: proxier.published(),
        health: Arc::clone(&health),
        ctx: Arc::clone(proxier.context()),
        health_checks: service_health.published(),
    };
    // Our admin listeners, duplicated, for a hand-over to our successor.
    let mut admin_fds: Vec<(handover::Kind, u16, std::os::fd::OwnedFd)> = Vec::new();
    for (addr, router, what, kind) in [
        (
            args.metrics_bind_address,
            admin::metrics_router(state.clone()),
            admin::AdminListener::Metrics,
            handover::Kind::Metrics,
        ),
        (
            args.healthz_bind_address,
            admin::healthz_router(state),
            admin::AdminListener::Healthz,
            handover::Kind::Healthz,
        ),
    ] {
        let socket = match inherited.take_admin(kind, addr) {
            Some(l) => Ok(l),
            None => admin::bind(addr),
        };
        let spawned = match socket {
            Ok(l) => {
                match l.try_clone() {
                    Ok(dup) => {
                        let port = dup.local_addr().map_or(0, |a| a.port());
                        admin_fds.push((kind, port, dup.into()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep the {} listener for a hand-over", what.as_str())
                    }
                }
                admin::spawn_on(l, what, router, stop_admin.clone()).await
            }
            Err(e) => Err(e),
        };
        match spawned {
            Ok(bound) => tracing::info!(address = %bound, "{} server listening", what.as_str()),
            // The proxy itself still works; the probe or scrape will say so.
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot serve {}", what.as_str())
            }
        }
    }
    let stop_discovery = CancellationToken::new();
    let snapshots = match source {
        Source::Manifests(source, options) => {
            manifests::spawn_with(source, options, stop_discovery.clone())
                .await
                .map_err(|e| ConfigError(e.to_string()))?
        }
        Source::Kube(client, options) => {
            // The admin servers already answer: /readyz is 503 until the
            // first complete list is applied.
            let first = discovery::kube::spawn(*client, options, stop_discovery.clone());
            // While waiting, /healthz stays healthy: nothing is queued yet.
            tokio::select! {
                r = first => r?,
                _ = shutdown_signal() => {
                    tracing::info!("stopped before the first list");
                    stop_discovery.cancel();
                    // Mid hand-over the predecessor still serves with these rules.
                    if let Some(r) = rules.filter(|_| takeover.is_none()) {
                        if let Err(e) = r.iptables.cleanup().await {
                            tracing::error!(error = %e, "cannot remove iptables rules; run --cleanup");
                        }
                    }
                    stop_admin.cancel();
                    return Ok(());
                }
            }
        }
    };
    // A snapshot published is an update queued until the run loop has
    // applied it (upstream's QueuedUpdate), even if the loop is stuck.
    let applied = crate::runloop::mark_queued(snapshots.clone(), Arc::clone(&health));
    if let Some(t) = takeover.take() {
        // Serve the handed-over sockets before the predecessor stops accepting.
        let snapshot = Arc::clone(&snapshots.borrow());
        let r = proxier.sync(&snapshot);
        let closed = proxier.drop_unadopted();
        let old_pid = t.old_pid;
        match t.serving() {
            Ok(()) => {
                tracing::info!(old_pid, listening = r.listening, not_adopted = closed, took = ?started.elapsed(), "hand-over: serving; the predecessor stops accepting and hands its connections over");
                let published = proxier.published();
                let ctx = Arc::clone(proxier.context());
                // Off the control loop: connections arrive while we serve.
                tokio::task::spawn_blocking(move || {
                    let received = std::time::Instant::now();
                    match t.receive_connections(|d, c, b| resume(d, c, b, &published, &ctx)) {
                        Ok(n) => {
                            tracing::info!(old_pid, connections = n, took = ?received.elapsed(), "hand-over: connections carried over")
                        }
                        Err(e) => {
                            tracing::warn!(old_pid, error = %e, "hand-over: connections not all received; the rest stay with the predecessor or are lost with it")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(old_pid, error = %e, "hand-over: predecessor gone before it heard we serve; serving anyway")
            }
        }
    }
    let mut connections_sent = None;
    let (exports, handed_over) = match &handover_path {
        None => (None, None),
        Some(path) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
            connections_sent = Some(sent_rx);
            let ctx = Arc::clone(proxier.context());
            match handover::Server::bind(path)
                .and_then(|s| s.spawn(tx, done_tx, admin_fds, ctx, sent_tx))
            {
                Ok(h) => {
                    tracing::info!(path = %path.display(), "hand-over socket ready: a new process started with it takes over");
                    (Some(rx), Some((h, done_rx)))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(path = %path.display(), "no hand-over socket (its directory does not exist): a restart will drain instead");
                    (None, None)
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "no hand-over socket: a restart will drain instead");
                    (None, None)
                }
            }
        }
    };
    let (server, handed_over) = match handed_over {
        Some((h, rx)) => (Some(h), Some(rx)),
        None => (None, None),
    };
    let successor = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stop = {
        let successor = Arc::clone(&successor);
        async move {
            let handed = async {
                match handed_over {
                    Some(rx) => match rx.await {
                        Ok(pid) => {
                            successor.store(pid.max(1), std::sync::atomic::Ordering::Relaxed)
                        }
                        Err(_) => std::future::pending().await,
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = handed => {}
            }
        }
    };
    let run_loop = Loop {
        proxier,
        rules,
        service_health,
        health,
        sync_period: args.iptables_sync_period,
        exports,
        applied,
    };
    let Loop {
        mut proxier,
        rules,
        mut service_health,
        ..
    } = run_loop.serve(snapshots, stop).await;
    // Handed over or stopping: the successor answers the probes, or
    // nobody should.
    service_health.close().await;
    stop_discovery.cancel();
    let new_pid = successor.load(std::sync::atomic::Ordering::Relaxed);
    if new_pid != 0 {
        // Handed over: our copies of the listeners close (the successor's
        // accept them, queues included); the rules stay, they are its rules.
        tracing::info!(new_pid, grace = ?args.shutdown_grace, "handed over: listeners closed here, rules kept, draining connections");
        proxier.close_listeners();
        stop_admin.cancel();
        drop(rules);
        // Connections park and go to the successor; the rest drain here.
        if let Some(rx) = connections_sent {
            match tokio::time::timeout(Duration::from_secs(60), rx).await {
                Ok(Ok(n)) => tracing::info!(connections = n, "connections handed over"),
                _ => tracing::warn!("connection hand-over did not finish; draining here"),
            }
        }
        let left = tokio::select! {
            left = proxier.shutdown(args.shutdown_grace) => left,
            _ = shutdown_signal() => {
                tracing::warn!("signal while draining after the hand-over: exiting at once");
                std::process::exit(1);
            }
        };
        if left > 0 {
            tracing::warn!(connections = left, "grace period over; closing the rest");
        }
        tracing::info!("hand-over complete: exiting");
        return Ok(());
    }
    if let Some(server) = &server {
        server.remove();
    }
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: listeners closed, draining connections");
    proxier.close_listeners();
    let finish = async {
        if let Some(r) = rules {
            match r.iptables.cleanup().await {
                Ok(()) => tracing::info!("iptables rules removed"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot remove iptables rules; run --cleanup")
                }
            }
        }
        proxier.shutdown(args.shutdown_grace).await
    };
    let result = tokio::select! {
        left = finish => {
            if left > 0 {
                tracing::warn!(connections = left, "grace period over; closing the rest");
            }
            Ok(())
        }
        _ = shutdown_signal() => {
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        }
    };
    stop_admin.cancel();
    result
}

/// `rules`: prints the payload for the discovery source, changes nothing.
pub async fn rules(mut args: RunArgs) -> anyhow::Result<()> {
    args.bind_address = crate::proxy::listener::listen_address(args.bind_address);
    let snapshot = match discovery_source(&args).await? {
        Source::Manifests(source, options) => {
            let (snapshot, problems) =
                manifests::load_with(&source, &options).map_err(|e| ConfigError(e.to_string()))?;
            for p in &problems {
                tracing::warn!("skipped: {p}");
            }
            snapshot
        }
        Source::Kube(client, options) => {
            let stop = CancellationToken::new();
            let rx = tokio::select! {
                r = discovery::kube::spawn(*client, options, stop.clone()) => r?,
                _ = shutdown_signal() => return Ok(()),
            };
            let snapshot = Snapshot::clone(&rx.borrow());
            stop.cancel();
            snapshot
        }
    };
    // Listeners live only while rendering: any fd limit will do.
    let mut proxier = Proxier::new(proxy_config(&args, 1024));
    proxier.sync(&snapshot);
    print!(
        "{}",
        iptables::preview(
            &iptables::portals(&proxier),
            args.bind_address,
            &proxier.detector()
        )
    );
    proxier.shutdown(Duration::ZERO).await;
    Ok(())
}

/// Runs a connection handed over by the predecessor: its service port and
/// endpoint looked up by name and address (an endpoint no longer in the
/// set still gets its bytes moved); a connection of a service port we do
/// not serve is reset.
fn resume(
    d: handover::ConnDesc,
    client: std::os::fd::OwnedFd,
    backend: std::os::fd::OwnedFd,
    published: &crate::proxy::Published,
    ctx: &Arc<crate::proxy::Context>,
) {
    use crate::proxy::{balancer::Backend, conn::Flow, tcp};
    let (client, backend) = (
        std::net::TcpStream::from(client),
        std::net::TcpStream::from(backend),
    );
    let views = published.load();
    let Some(service) = views.iter().find(|v| v.service.name == d.service) else {
        tracing::warn!(service = %d.service, "handed-over connection of a service port not served: reset");
        for s in [&client, &backend] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        return;
    };
    let service = Arc::clone(&service.service);
    // Both balancers list every endpoint, with the same live state.
    let endpoint = service
        .balancer
        .endpoints()
        .into_iter()
        .map(|(_, b)| b)
        .find(|b| b.addr == d.endpoint)
        .unwrap_or_else(|| Arc::new(Backend::detached(d.endpoint)));
    let up = Flow::resumed(d.up_bytes, d.up_ended);
    let down = Flow::resumed(d.down_bytes, d.down_ended);
    if let Err(e) = tcp::resume(client, backend, d.peer, service, endpoint, up, down, ctx) {
        tracing::warn!(error = %e, "cannot resume a handed-over connection");
    }
}
