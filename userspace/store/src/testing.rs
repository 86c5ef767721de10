//! Test support: a real etcd server on loopback (feature `test-support`).
//!
//! [`EtcdServer::start`] runs `/usr/bin/etcd` (or `$CONTIV_ETCD_BIN`) on free loopback ports
//! with a temporary data dir; [`EtcdServer::kill`] and [`EtcdServer::restart`] simulate a
//! crash (same ports and data); Drop kills the process (by its pid, the child we started).
//! etcd also gets SIGKILL if the thread that started it dies (`PR_SET_PDEATHSIG`), so a test
//! process killed by a timeout leaves no etcd behind: start it on the thread that owns it
//! (the test's own thread), not inside a short-lived spawned thread.
//! [`EtcdServer::start_with_args`] passes more flags (shorter timers); [`EtcdCluster::start`]
//! runs several members as one cluster, and [`EtcdServer::pause`] / [`EtcdServer::resume`]
//! freeze a member (SIGSTOP) as if it were cut off.
//!
//! [`TestPki`] makes a throwaway CA with a server and a client certificate (rcgen), and
//! [`EtcdServer::start_tls`] runs etcd with them: `https://` client URLs, client
//! certificates required and checked against the CA.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) etcd started for a test.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP port of `/health` (and `/metrics`) when the client port speaks TLS.
    health_port: Option<u16>,
    tls: Option<ServerTls>,
    bin: PathBuf,
    /// Member name, and the cluster's `--initial-cluster` (just this member when alone).
    name: String,
    initial_cluster: Option<String>,
    /// More flags for etcd (e.g. shorter timers).
    extra_args: Vec<String>,
}

/// Several etcd members forming one cluster (see [`EtcdCluster::start`]).
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members on loopback as one new cluster, each with `extra_args` (e.g.
    /// `--election-timeout=500`), and waits until every one is healthy (has a leader).
    pub fn start(n: usize, extra_args: &[&str]) -> Result<Self, EtcdStartError> {
        let bin = etcd_bin();
        let mut last = None;
        for _ in 0..3 {
            let mut members = Vec::with_capacity(n);
            for i in 0..n {
                let mut m = EtcdServer::new(None, bin.clone(), extra_args)?;
                m.name = format!("m{i}");
                members.push(m);
            }
            let cluster = members
                .iter()
                .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
                .collect::<Vec<_>>()
                .join(",");
            let mut started = Ok(());
            for m in &mut members {
                m.initial_cluster = Some(cluster.clone());
                if let Err(e) = m.spawn_process() {
                    started = Err(e);
                    break;
                }
            }
            // Members become healthy together, once they elected a leader.
            for m in &mut members {
                if started.is_ok() {
                    started = m.wait_ready();
                }
            }
            match started {
                Ok(()) => return Ok(Self { members }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EtcdStartError::NotReady { log: String::new() }))
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }
}

/// The server side of [`TestPki`], as etcd's flags want it.
#[derive(Debug, Clone)]
struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A throwaway PKI in a temp dir: a CA, a server certificate for `localhost` and
/// `127.0.0.1`, and a client certificate (CN `contiv-test-client`), all PEM; plus a
/// second, unrelated CA to test that a wrong CA is refused.
pub struct TestPki {
    dir: tempfile::TempDir,
}

/// Why a test PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl TestPki {
    /// Generates the CA and the certificates and writes them as PEM files.
    pub fn generate() -> Result<Self, PkiError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new().prefix("contiv-pki-").tempdir()?;
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem);
        let ca = |cn: &str| -> Result<(CertificateParams, KeyPair, String), PkiError> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate()?;
            let pem = params.self_signed(&key)?.pem();
            Ok((params, key, pem))
        };
        let (ca_params, ca_key, ca_pem) = ca("contiv test CA")?;
        write("ca.pem", ca_pem)?;
        let (_, _, other_pem) = ca("unrelated CA")?;
        write("other-ca.pem", other_pem)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose, name: &str| -> Result<(), PkiError> {
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            write(&format!("{name}.pem"), params.signed_by(&key, &issuer)?.pem())?;
            write(&format!("{name}-key.pem"), key.serialize_pem())?;
            Ok(())
        };
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "etcd", ExtendedKeyUsagePurpose::ServerAuth, "server")?;
        leaf(vec![], "contiv-test-client", ExtendedKeyUsagePurpose::ClientAuth, "client")?;
        Ok(Self { dir })
    }

    /// Directory of the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The client certificate and its key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("client.pem"), self.dir.path().join("client-key.pem"))
    }

    /// The client-side store settings: this CA, the client certificate.
    pub fn client_tls(&self) -> crate::TlsConfig {
        let (cert, key) = self.client();
        crate::TlsConfig { ca_file: self.ca(), cert_file: Some(cert), key_file: Some(key), server_name: None }
    }

    fn server(&self) -> ServerTls {
        ServerTls {
            ca: self.ca(),
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server-key.pem"),
        }
    }
}

/// Why an etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd did not become healthy in time (log: {log})")]
    NotReady { log: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("CONTIV_ETCD_BIN").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> Result<Self, EtcdStartError> {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over TLS with `pki`'s server certificate, requiring
    /// client certificates signed by its CA (`--client-cert-auth`).
    pub fn start_tls(pki: &TestPki) -> Result<Self, EtcdStartError> {
        Self::start_with(Some(pki.server()))
    }

    /// Starts etcd serving clients over TLS with these PEM files (e.g. made by
    /// deploy/tls/gen-certs.sh), requiring client certificates signed by `ca`.
    pub fn start_tls_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, EtcdStartError> {
        Self::start_with(Some(ServerTls { ca: ca.to_owned(), cert: cert.to_owned(), key: key.to_owned() }))
    }

    /// Starts etcd with more flags (e.g. `--experimental-watch-progress-notify-interval=200ms`).
    pub fn start_with_args(extra_args: &[&str]) -> Result<Self, EtcdStartError> {
        Self::start_full(None, extra_args)
    }

    fn start_with(tls: Option<ServerTls>) -> Result<Self, EtcdStartError> {
        Self::start_full(tls, &[])
    }

    fn start_full(tls: Option<ServerTls>, extra_args: &[&str]) -> Result<Self, EtcdStartError> {
        let bin = etcd_bin();
        let mut last = None;
        // Free ports can be taken between probing and binding: try a few times.
        for _ in 0..3 {
            let mut server = Self::new(tls.clone(), bin.clone(), extra_args)?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(EtcdStartError::NotReady { log: String::new() }))
    }

    /// A server not started yet, on fresh ports and a fresh data dir.
    fn new(tls: Option<ServerTls>, bin: PathBuf, extra_args: &[&str]) -> Result<Self, EtcdStartError> {
        Ok(Self {
            child: None,
            dir: tempfile::Builder::new().prefix("contiv-etcd-").tempdir()?,
            client_port: free_port()?,
            peer_port: free_port()?,
            health_port: if tls.is_some() { Some(free_port()?) } else { None },
            tls,
            bin,
            name: "test".into(),
            initial_cluster: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// The client URL (`http://127.0.0.1:PORT`, or `https://` when started with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the running etcd, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL, like a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes etcd (SIGSTOP): it neither answers nor takes part in the cluster, as if cut
    /// off, until [`resume`](Self::resume).
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a [`pause`](Self::pause)d etcd run again (SIGCONT).
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of our own child, which we have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// Kills etcd and deletes its data (a lost or replaced store); `restart` brings up an
    /// empty one on the same ports.
    pub fn kill_and_wipe(&mut self) -> std::io::Result<()> {
        self.kill();
        match std::fs::remove_dir_all(self.dir.path().join("data")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Starts etcd again on the same ports and data dir (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> Result<(), EtcdStartError> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), EtcdStartError> {
        self.spawn_process()?;
        self.wait_ready()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn_process(&mut self) -> Result<(), EtcdStartError> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let name = self.name.clone();
        let initial_cluster = self.initial_cluster.clone().unwrap_or_else(|| format!("{name}={peer}"));
        let mut command = Command::new(&self.bin);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(self.tls_args())
            .args(&self.extra_args)
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| EtcdStartError::Spawn { bin: self.bin.clone(), source })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the started etcd answers `/health` (kills it if it does not in time).
    fn wait_ready(&mut self) -> Result<(), EtcdStartError> {
        let log_path = self.log_path();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                break;
            }
            if healthy(self.health_port.unwrap_or(self.client_port)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: String =
            log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        Err(EtcdStartError::NotReady { log: tail })
    }
}

impl EtcdServer {
    /// etcd's TLS flags, and a plain-HTTP listener for `/health`.
    fn tls_args(&self) -> Vec<String> {
        let (Some(tls), Some(health)) = (&self.tls, self.health_port) else { return vec![] };
        vec![
            format!("--cert-file={}", tls.cert.display()),
            format!("--key-file={}", tls.key.display()),
            format!("--trusted-ca-file={}", tls.ca.display()),
            "--client-cert-auth=true".into(),
            format!("--listen-metrics-urls=http://127.0.0.1:{health}"),
        ]
    }
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One call a store in front of a real one ([`Intercepted`]) passes on.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Get(&'a str),
    Put(&'a str),
    Delete(&'a str),
    DeletePrefix(&'a str),
    List(&'a str),
    Txn(&'a crate::Txn),
}

impl Call<'_> {
    /// The keys (a prefix, for `DeletePrefix`) the call may write: a transaction's puts and
    /// deletes, of either branch.
    pub fn writes(&self) -> Vec<&str> {
        match self {
            Call::Put(k) | Call::Delete(k) | Call::DeletePrefix(k) => vec![k],
            Call::Txn(t) => t
                .success
                .iter()
                .chain(&t.failure)
                .filter_map(|op| match op {
                    crate::TxnOp::Put { key, .. } | crate::TxnOp::Delete { key } => Some(key.as_str()),
                    crate::TxnOp::Get { .. } => None,
                })
                .collect(),
            Call::Get(_) | Call::List(_) => vec![],
        }
    }
}

/// What a test's store in front of a real one does: faults, counts, another writer's
/// changes. Both hooks default to passing the call on.
#[async_trait::async_trait]
pub trait Intercept: Send + Sync {
    /// Runs before each key-value call; an error fails the call, which is not passed on.
    async fn before(&self, _inner: &dyn crate::Store, _call: Call<'_>) -> Result<(), crate::StoreError> {
        Ok(())
    }
    /// Answers a watch instead of the real store, when it returns `Some`.
    async fn watch(
        &self,
        _inner: &dyn crate::Store,
        _prefix: &str,
        _from: crate::Revision,
    ) -> Option<Result<crate::WatchStream, crate::StoreError>> {
        None
    }
}

/// A store that passes every call on to `inner` after `hook` had its say (leases and
/// compaction go straight through).
pub struct Intercepted<I> {
    pub inner: std::sync::Arc<dyn crate::Store>,
    pub hook: I,
}

impl<I> Intercepted<I> {
    pub fn new(inner: std::sync::Arc<dyn crate::Store>, hook: I) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { inner, hook })
    }
}

#[async_trait::async_trait]
impl<I: Intercept> crate::Store for Intercepted<I> {
    async fn get(&self, key: &str) -> Result<Option<crate::KeyValue>, crate::StoreError> {
        self.hook.before(&*self.inner, Call::Get(key)).await?;
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<crate::LeaseId>,
    ) -> Result<crate::Revision, crate::StoreError> {
        self.hook.before(&*self.inner, Call::Put(key)).await?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool, crate::StoreError> {
        self.hook.before(&*self.inner, Call::Delete(key)).await?;
        self.inner.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, crate::StoreError> {
        self.hook.before(&*self.inner, Call::DeletePrefix(prefix)).await?;
        self.inner.delete_prefix(prefix).await
    }
    async fn list(&self, prefix: &str) -> Result<crate::ListResult, crate::StoreError> {
        self.hook.before(&*self.inner, Call::List(prefix)).await?;
        self.inner.list(prefix).await
    }
    async fn txn(&self, txn: crate::Txn) -> Result<crate::TxnResult, crate::StoreError> {
        self.hook.before(&*self.inner, Call::Txn(&txn)).await?;
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl_secs: i64) -> Result<crate::LeaseId, crate::StoreError> {
        self.inner.lease_grant(ttl_secs).await
    }
    async fn lease_keep_alive(&self, lease: crate::LeaseId) -> Result<i64, crate::StoreError> {
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: crate::LeaseId) -> Result<(), crate::StoreError> {
        self.inner.lease_revoke(lease).await
    }
    async fn watch(&self, prefix: &str, from: crate::Revision) -> Result<crate::WatchStream, crate::StoreError> {
        match self.hook.watch(&*self.inner, prefix, from).await {
            Some(answer) => answer,
            None => self.inner.watch(prefix, from).await,
        }
    }
    async fn compact(&self, revision: crate::Revision) -> Result<(), crate::StoreError> {
        self.inner.compact(revision).await
    }
    fn backend(&self) -> &'static str {
        "intercepted"
    }
}
