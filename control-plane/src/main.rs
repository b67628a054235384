//! `weft-cp`: the control plane's command line. `serve` streams a mesh
//! directory's configuration to proxies over xDS; `validate` checks mesh
//! directories and proxy configuration files with the proxy's own
//! validator; `status` shows what a running control plane serves and what
//! each proxy acknowledged; `demo` runs a whole mesh on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_cp::serve::{CaSource, ControlPlane, ServeOptions};
use weft_cp::xds::{Auth, XdsLimits};
use weft_cp::{flags, mesh, status};
use weft_proxy::config::Config;

/// How long `status` waits for each step of its request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Weft's control plane.
#[derive(Debug, Parser)]
#[command(name = "weft-cp", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check mesh directories and proxy configuration files, and report
    /// every problem with its file, resource and field.
    ///
    /// A directory is a mesh: its *.yaml/*.yml files (not recursive) hold
    /// services and gateways; it is checked as a whole, including each
    /// node's generated proxy configuration. A file is one proxy
    /// configuration, as `weft-proxy --check-config` reads it.
    Validate {
        /// Mesh directories and/or proxy configuration files.
        #[arg(required = true, value_name = "DIR|FILE")]
        paths: Vec<PathBuf>,
        /// Accept a mesh directory with no services and no gateways (as
        /// `serve --allow-empty` would serve it).
        #[arg(long)]
        allow_empty: bool,
    },
    /// Serve a mesh directory to proxies over xDS, pushing every valid
    /// change to the proxies it affects.
    Serve(ServeArgs),
    /// Run a whole mesh on loopback: the control plane with config/demo,
    /// echo services with weft-proxy sidecars, and an ingress gateway.
    Demo(weft_cp::demo::DemoArgs),
    /// Certificates from the mesh's certificate authority.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Per-node bootstrap tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show a running control plane's mesh generation, last config error
    /// and connected proxies with what each acknowledged or rejected.
    Status {
        /// The control plane's admin address (host:port).
        #[arg(long)]
        admin: SocketAddr,
        /// A file holding the bootstrap token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `weft-cp cert` commands.
#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue an X.509-SVID (one URI SAN: the SPIFFE ID; client and server
    /// authentication) for a workload or client outside the mesh: writes
    /// cert.pem (the certificate, then the CA's chain), key.pem (mode
    /// 0600) and ca.pem (the trust bundle) to --out.
    Issue {
        /// The identity: spiffe://<trust-domain>/<path>, in the CA's trust
        /// domain.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// Also a DNS name (repeatable), for clients that verify a host
        /// name rather than the SPIFFE ID (curl, browsers).
        #[arg(long = "dns-name", value_name = "NAME")]
        dns_names: Vec<String>,
        /// Directory to write cert.pem, key.pem and ca.pem to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime of the certificate (at most 366 days).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The control plane's state directory. Its CA (ca.pem, ca.key) is
        /// created there on first use, for the SPIFFE ID's trust domain.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "ca_cert",
            conflicts_with = "ca_cert"
        )]
        state_dir: Option<PathBuf>,
        /// An operator's CA certificate (root or intermediate, followed by
        /// its chain), with a spiffe://<trust-domain> URI SAN.
        #[arg(long, value_name = "FILE", requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The operator's CA key.
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_key: Option<PathBuf>,
    },
    /// Show each certificate of a PEM file: subject, SPIFFE ID and other
    /// names, issuer, serial, validity. Keys in the file are never shown.
    Inspect {
        /// A PEM file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// `weft-cp token` commands.
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue the bootstrap token of one node (a workload or gateway):
    /// accepted by `weft-cp serve --state-dir DIR` for that node only, on
    /// the xDS and identity APIs (never the admin API). Give it to the
    /// node's proxy with --token-file.
    Issue {
        /// The node id, as the mesh names the workload or gateway.
        #[arg(long, value_name = "ID")]
        node_id: String,
        /// The control plane's state directory (its token key is created
        /// there on first use).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Write the token to this file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `weft-cp serve` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("auth").required(true).args(["token_file", "insecure"])))]
struct ServeArgs {
    /// The mesh directory (its *.yaml/*.yml files), watched for changes.
    #[arg(long, value_name = "DIR")]
    config_dir: PathBuf,
    /// Where proxies connect (gRPC over h2c).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18000")]
    xds: SocketAddr,
    /// Where the admin API (status, metrics, readiness) listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18001")]
    admin: SocketAddr,
    /// A file holding the bootstrap token proxies and operators present
    /// (this or --insecure).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Accept every client without a token (local experiments only; this
    /// or --token-file).
    #[arg(long)]
    insecure: bool,
    /// How often the directory is checked for changes (10ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = flags::poll_interval)]
    poll_interval: Duration,
    /// Serve an empty mesh, and apply changes that remove every listener
    /// of a connected proxy. Without it both are refused (logged, shown in
    /// `status`) and the last good state is kept: they are what an
    /// unmounted volume or a bad deploy looks like.
    #[arg(long)]
    allow_empty: bool,
    /// xDS connections open at once; more are closed when accepted.
    #[arg(long, value_name = "N", default_value_t = XdsLimits::DEFAULT_MAX_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(flags::MAX_CONNECTIONS))]
    max_xds_connections: u64,
    /// How long a new xDS connection may take to send the HTTP/2 preface
    /// and open its first authenticated stream (100ms to 5m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = flags::handshake_timeout)]
    xds_handshake_timeout: Duration,
    /// The state directory: the key of node tokens, and, unless --ca-cert
    /// is given, the mesh's CA (ca.pem, and ca.key mode 0600), created
    /// there on first start for the mesh's trust_domain. A mesh with a
    /// trust_domain needs this or --ca-cert and --ca-key.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// An operator's CA certificate (root or intermediate, followed by its
    /// chain) with a spiffe://<trust-domain> URI SAN, instead of one in
    /// --state-dir.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The operator's CA key.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The trust bundle pushed to proxies (PEM CA certificates), when it
    /// must hold more than the signing CA's root: during a CA rotation,
    /// the new root beside the old. Must include the signing CA's root.
    /// The CA files and this one are re-read when they change.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// Accept only node tokens (`weft-cp token issue`) on the xDS and
    /// identity APIs: the --token-file token then serves operators (the
    /// admin API) only. Needs --state-dir.
    #[arg(long, requires = "state_dir")]
    require_node_tokens: bool,
    /// Lifetime of workload certificates, and the longest a proxy may ask
    /// for (5s to 366 days); proxies renew at about half of it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = flags::svid_ttl)]
    svid_ttl: Duration,
    /// Print the bound addresses as one JSON line on stdout once serving.
    #[arg(long)]
    print_addresses: bool,
    /// Log filter (overrides RUST_LOG), e.g. `info` or `weft_cp=debug`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Validate { paths, allow_empty } => validate(&paths, allow_empty),
        Command::Serve(args) => exit(serve(&args)),
        Command::Demo(args) => exit(weft_cp::demo::run(&args)),
        Command::Cert(command) => exit(cert(command)),
        Command::Token(command) => exit(token(command)),
        Command::Status {
            admin,
            token_file,
            json,
        } => exit(show_status(admin, token_file.as_deref(), json)),
    }
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Issue {
        node_id,
        state_dir,
        out,
    } = command;
    anyhow::ensure!(
        !node_id.is_empty() && node_id.len() <= 512 && !node_id.contains(char::is_whitespace),
        "--node-id {node_id:?}: expected a node id (a workload's or gateway's name)"
    );
    let tokens = weft_cp::xds::NodeTokens::load_or_create(&state_dir)?;
    let token = tokens.issue(&node_id);
    match out {
        Some(path) => {
            weft_cp::ca::write_private_file(&path, format!("{token}\n").as_bytes())?;
            println!("node token for {node_id:?} written to {}", path.display());
        }
        None => println!("{token}"),
    }
    Ok(())
}

fn cert(command: CertCommand) -> anyhow::Result<()> {
    use weft_cp::ca::{self, Ca};
    match command {
        CertCommand::Issue {
            spiffe_id,
            dns_names,
            out,
            ttl,
            state_dir,
            ca_cert,
            ca_key,
        } => {
            let ca = match (state_dir, ca_cert, ca_key) {
                (Some(dir), _, _) => {
                    let domain =
                        weft_proxy::config::spiffe_trust_domain(&spiffe_id).with_context(|| {
                            format!(
                                "--spiffe-id {spiffe_id:?}: expected spiffe://<trust-domain>/<path>"
                            )
                        })?;
                    Ca::load_or_create(&dir, domain)?
                }
                (None, Some(cert), Some(key)) => Ca::from_files(&cert, &key)?,
                _ => anyhow::bail!("give --state-dir DIR, or --ca-cert FILE with --ca-key FILE"),
            };
            let issued = ca.issue(&spiffe_id, &dns_names, ttl)?;
            let [cert, key, bundle] = ca::write_issued(&out, &issued, &ca)?;
            println!("issued {spiffe_id}");
            println!(
                "  expires  {}",
                humantime::format_rfc3339_seconds(issued.not_after)
            );
            println!("  cert     {}", cert.display());
            println!("  key      {}", key.display());
            println!("  ca       {}", bundle.display());
            Ok(())
        }
        CertCommand::Inspect { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let summaries =
                ca::inspect(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for (i, cert) in summaries.iter().enumerate() {
                println!("certificate {} of {}", i + 1, summaries.len());
                let subject = if cert.subject.is_empty() {
                    "(none)"
                } else {
                    &cert.subject
                };
                println!("  subject     {subject}");
                for uri in &cert.uris {
                    let label = if uri.starts_with("spiffe://") {
                        "spiffe id"
                    } else {
                        "uri"
                    };
                    println!("  {label:<11} {uri}");
                }
                for dns in &cert.dns_names {
                    println!("  dns         {dns}");
                }
                println!("  issuer      {}", cert.issuer);
                println!("  serial      {}", cert.serial);
                println!("  valid from  {}", cert.not_before);
                println!("  expires     {}", cert.not_after);
                if cert.is_ca {
                    println!("  ca          yes");
                }
            }
            Ok(())
        }
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft-cp: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    weft_proxy::cli::init_logging(args.log_level.as_deref()).context("--log-level")?;
    let auth = match &args.token_file {
        Some(path) => Auth::token(weft_proxy::cli::read_token(path)?),
        None => Auth::Insecure,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weft-cp")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Before the ports open: from then on a SIGTERM must drain.
        let mut shutdown = weft_proxy::cli::ShutdownSignal::install();
        let control_plane = ControlPlane::start(ServeOptions {
            config_dir: args.config_dir.clone(),
            xds_addr: args.xds,
            admin_addr: args.admin,
            auth,
            poll_interval: args.poll_interval,
            drain_timeout: Duration::from_secs(5),
            allow_empty: args.allow_empty,
            limits: XdsLimits {
                max_connections: usize::try_from(args.max_xds_connections)
                    .context("--max-xds-connections does not fit this platform")?,
                handshake_timeout: args.xds_handshake_timeout,
            },
            ca: match (&args.state_dir, &args.ca_cert, &args.ca_key) {
                (_, Some(cert), Some(key)) => Some(CaSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (Some(dir), _, _) => Some(CaSource::StateDir(dir.clone())),
                _ => None,
            },
            trust_bundle: args.trust_bundle.clone(),
            svid_ttl: args.svid_ttl,
            node_tokens_dir: args.state_dir.clone(),
            require_node_tokens: args.require_node_tokens,
        })
        .await?;
        if args.print_addresses {
            let server = control_plane.server();
            println!(
                "{}",
                serde_json::json!({
                    "xds": server.xds_addr().to_string(),
                    "admin": server.admin_addr().to_string(),
                })
            );
        }
        shutdown.recv().await;
        control_plane.shutdown().await;
        anyhow::Ok(())
    })
}

fn show_status(
    admin: SocketAddr,
    token_file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let token = token_file.map(weft_proxy::cli::read_token).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let body = runtime
        .block_on(status::fetch_json(admin, token.as_deref(), STATUS_TIMEOUT))
        .with_context(|| format!("fetching the status from {admin}"))?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        let report = status::parse(&body).context("reading the status")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", status::render_table(&report, now));
    }
    Ok(())
}

fn validate(paths: &[PathBuf], allow_empty: bool) -> ExitCode {
    let mut failed = 0;
    for path in paths {
        let ok = if path.is_dir() {
            validate_mesh(path, allow_empty)
        } else {
            validate_proxy_file(path)
        };
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} path(s) invalid", paths.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn validate_mesh(dir: &Path, allow_empty: bool) -> bool {
    let built = mesh::load_dir(dir).and_then(|mesh| {
        let snapshot = mesh.snapshot()?;
        Ok((mesh, snapshot))
    });
    match built {
        Ok((_, snapshot)) if snapshot.nodes.is_empty() && !allow_empty => {
            eprintln!(
                "{}: invalid mesh:\nno services and no gateways (weft-cp serve refuses an empty mesh unless --allow-empty)",
                dir.display()
            );
            false
        }
        Ok((mesh, snapshot)) => {
            let tests_passed = run_policy_tests(dir, &mesh);
            if tests_passed {
                println!(
                    "{}: ok ({} service(s), {} gateway(s), {} policy(ies), {} node(s))",
                    dir.display(),
                    mesh.services().len(),
                    mesh.gateways().len(),
                    mesh.policies().len(),
                    snapshot.nodes.len()
                );
            }
            tests_passed
        }
        Err(errors) => {
            eprintln!("{}: invalid mesh:\n{errors}", dir.display());
            false
        }
    }
}

/// Runs the Rego unit tests beside the mesh's policies, as `opa test`
/// does; prints one line per test and returns whether all passed.
fn run_policy_tests(dir: &Path, mesh: &mesh::Mesh) -> bool {
    let mut ok = true;
    for report in mesh.run_policy_tests() {
        match report.outcomes {
            Ok(outcomes) => {
                for outcome in outcomes {
                    match &outcome.failure {
                        None => println!("policy {:?}: {}: PASS", report.policy, outcome.rule),
                        Some(why) => {
                            ok = false;
                            eprintln!("policy {:?}: {}: FAIL ({why})", report.policy, outcome.rule);
                        }
                    }
                }
            }
            Err(error) => {
                ok = false;
                eprintln!("policy {:?}: tests cannot run: {error}", report.policy);
            }
        }
    }
    if !ok {
        eprintln!("{}: invalid mesh: policy tests failed", dir.display());
    }
    ok
}

fn validate_proxy_file(file: &Path) -> bool {
    match Config::from_file(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            true
        }
        Err(error) => {
            eprintln!("{error}");
            false
        }
    }
}
