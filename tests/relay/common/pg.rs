//! PostgreSQL for the tests, always a real server: a fresh database per test
//! on the server at `RELAY_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped when its guard is
//! dropped; SQL against it from synchronous test code; and a throwaway
//! cluster (initdb + pg_ctl on a random port) that a test may stop and start.

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusqlite::types::Value as Sql;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

/// The server the tests use unless told otherwise.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `RELAY_TEST_POSTGRES_URL`, or the local default.
pub fn server_url() -> String {
    std::env::var("RELAY_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// `url` (a `postgres://` URL) pointing at database `dbname` instead.
pub fn with_database(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    format!("{}/{dbname}{query}", &base[..authority_end])
}

/// Runs async PostgreSQL work to the end from any context (a test's runtime
/// included) on a thread of its own.
pub fn block_on<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A connection (its driver task on the current runtime), or a panic that
/// says how to get a server.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url.parse().expect("a PostgreSQL URL");
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|err| {
        panic!(
            "PostgreSQL is not reachable at {url}: {err}. Start it (`.ci/run` does) or set \
             RELAY_TEST_POSTGRES_URL"
        )
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test; dropped (connections and all) with
/// the guard, also when the test panics.
pub struct TestDatabase {
    /// Its name on the server.
    pub name: String,
    /// Its URL, for the relay's `store.url`.
    pub url: String,
    server: String,
}

impl TestDatabase {
    /// A new database on the tests' server.
    pub fn create() -> TestDatabase {
        TestDatabase::create_on(&server_url())
    }

    /// A new database on the server at `server` (a URL to any database).
    pub fn create_on(server: &str) -> TestDatabase {
        TestDatabase::create_on_with(server, "")
    }

    /// A new database on the tests' server, made with `options` after
    /// `CREATE DATABASE name` (e.g. another encoding).
    pub fn create_with(options: &str) -> TestDatabase {
        TestDatabase::create_on_with(&server_url(), options)
    }

    fn create_on_with(server: &str, options: &str) -> TestDatabase {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "relay_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            ulid::Ulid::generate().to_string().to_lowercase()
        );
        let statement = format!("CREATE DATABASE {name} {options}");
        let url = server.to_owned();
        block_on(async move {
            let client = connect(&url).await;
            client
                .batch_execute(&statement)
                .await
                .unwrap_or_else(|err| panic!("{statement}: {err}"));
        });
        TestDatabase {
            url: with_database(server, &name),
            name,
            server: server.to_owned(),
        }
    }

    /// Rows of a query, as the SQLite helpers return them.
    pub fn query(&self, sql: &str) -> Vec<Vec<Sql>> {
        query(&self.url, sql)
    }

    /// Runs a statement with `?1`-style parameters; returns the rows changed.
    pub fn execute(&self, sql: &str, params: Vec<Sql>) -> u64 {
        execute(&self.url, sql, params)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let server = self.server.clone();
        let result = block_on(async move {
            let mut config: tokio_postgres::Config = server.parse().ok()?;
            config.connect_timeout(Duration::from_secs(5));
            let (client, connection) = config.connect(NoTls).await.ok()?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Some(client.batch_execute(&statement).await)
        });
        match result {
            Some(Ok(())) => {}
            Some(Err(err)) => eprintln!("could not drop test database {}: {err}", self.name),
            None => eprintln!(
                "could not drop test database {}: server unreachable",
                self.name
            ),
        }
    }
}

/// Rows of a query against the database at `url`, each value converted to
/// the SQLite value type the test helpers already use.
pub fn query(url: &str, sql: &str) -> Vec<Vec<Sql>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    block_on(async move {
        let client = connect(&url).await;
        let rows = client
            .query(sql.as_str(), &[])
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        rows.iter().map(row_values).collect()
    })
}

/// Runs `sql` (with SQLite's `?1` placeholders) against `url`.
pub fn execute(url: &str, sql: &str, params: Vec<Sql>) -> u64 {
    let (url, sql) = (url.to_owned(), placeholders(sql));
    block_on(async move {
        let client = connect(&url).await;
        let owned: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|value| -> Box<dyn ToSql + Sync + Send> {
                match value {
                    Sql::Null => Box::new(Option::<String>::None),
                    Sql::Integer(n) => Box::new(n),
                    Sql::Real(x) => Box::new(x),
                    Sql::Text(text) => Box::new(text),
                    Sql::Blob(bytes) => Box::new(bytes),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = owned
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        client
            .execute(sql.as_str(), &refs)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    })
}

/// `?1` → `$1`, so one statement text serves both backends.
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn row_values(row: &Row) -> Vec<Sql> {
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_();
            let value = match *ty {
                Type::INT2 => row.get::<_, Option<i16>>(i).map(|n| Sql::Integer(n.into())),
                Type::INT4 => row.get::<_, Option<i32>>(i).map(|n| Sql::Integer(n.into())),
                Type::INT8 => row.get::<_, Option<i64>>(i).map(Sql::Integer),
                Type::BOOL => row
                    .get::<_, Option<bool>>(i)
                    .map(|b| Sql::Integer(b.into())),
                Type::FLOAT4 => row.get::<_, Option<f32>>(i).map(|x| Sql::Real(x.into())),
                Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(Sql::Real),
                Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                    row.get::<_, Option<String>>(i).map(Sql::Text)
                }
                Type::BYTEA => row.get::<_, Option<Vec<u8>>>(i).map(Sql::Blob),
                ref other => panic!(
                    "column {i} has type {other}: cast it in the query (e.g. `::bigint`) so both \
                     backends return the same"
                ),
            };
            value.unwrap_or(Sql::Null)
        })
        .collect()
}

/// The directory of the PostgreSQL server programs (initdb, pg_ctl):
/// `RELAY_TEST_PG_BIN`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn server_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RELAY_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("pg_ctl").is_file().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server programs under /usr/lib/postgresql/*/bin (install the \
             `postgresql` package, or set RELAY_TEST_PG_BIN)"
        )
    })
}

/// A PostgreSQL cluster of the test's own on a random loopback port, run as
/// the `postgres` OS user when the tests run as root (the server refuses
/// root). Stopped and removed when dropped.
pub struct Cluster {
    /// Where it listens.
    pub port: u16,
    data: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    password: Option<String>,
}

impl Cluster {
    /// initdb and start, user `postgres` having to give `password`
    /// (scram-sha-256) over TCP; panics with the server's log when it cannot.
    pub fn start_with_password(password: &str) -> Cluster {
        Cluster::start_inner(Some(password.to_owned()))
    }

    fn start_inner(password: Option<String>) -> Cluster {
        let bin = server_bin_dir();
        let data = tempfile::tempdir().expect("temp dir");
        let pwfile = data.path().join("pwfile");
        if let Some(password) = &password {
            std::fs::write(&pwfile, format!("{password}\n")).expect("write pwfile");
        }
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(data.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            listener.local_addr().expect("addr").port()
        };
        let cluster = Cluster {
            port,
            data,
            bin,
            as_postgres,
            password,
        };
        let pgdata = cluster.pgdata();
        let mut args = vec![
            "-D".to_owned(),
            pgdata.display().to_string(),
            "-U".to_owned(),
            "postgres".to_owned(),
            "--no-sync".to_owned(),
            "-E".to_owned(),
            "UTF8".to_owned(),
        ];
        if cluster.password.is_some() {
            args.extend([
                "--auth-host=scram-sha-256".to_owned(),
                "--auth-local=trust".to_owned(),
                format!("--pwfile={}", pwfile.display()),
            ]);
        } else {
            args.extend(["-A".to_owned(), "trust".to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.run("initdb", &args);
        cluster.start_server();
        cluster
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`, without the password.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// [`Cluster::url`] with the password, for the test's own connections.
    pub fn admin_url(&self) -> String {
        match &self.password {
            Some(password) => format!(
                "postgres://postgres:{password}@127.0.0.1:{}/postgres",
                self.port
            ),
            None => self.url(),
        }
    }

    /// Stops the server (`-m fast`: connections are cut at once).
    pub fn stop(&self) {
        let pgdata = self.pgdata();
        self.run(
            "pg_ctl",
            &["stop", "-D", pgdata.to_str().unwrap(), "-m", "fast", "-w"],
        );
    }

    /// Starts it again on the same port and data.
    pub fn start_server(&self) {
        let pgdata = self.pgdata();
        let log = self.data.path().join("server.log");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=60",
            self.port,
            self.data.path().display()
        );
        let started = Instant::now();
        let output = self.command(
            "pg_ctl",
            &[
                "start",
                "-D",
                pgdata.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
            ],
        );
        if !output.status.success() {
            panic!(
                "pg_ctl start failed ({}): {}\n{}\nserver log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        eprintln!(
            "throwaway PostgreSQL on port {} started in {:?}",
            self.port,
            started.elapsed()
        );
    }

    fn pgdata(&self) -> PathBuf {
        self.data.path().join("pgdata")
    }

    fn command(&self, program: &str, args: &[&str]) -> std::process::Output {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .current_dir(self.data.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", path.display()))
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self.command(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pgdata = self.pgdata();
        let _ = self.command(
            "pg_ctl",
            &[
                "stop",
                "-D",
                pgdata.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
            ],
        );
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
