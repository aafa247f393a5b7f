//! A PostgreSQL database of one relay run: created on the server given with
//! `--postgres` (`CREATE DATABASE bench_<random>`), dropped when the run is
//! over, so every run starts from an empty schema like the SQLite runs.

use tokio_postgres::NoTls;

/// A database created for one run; dropped (with its connections) on drop.
pub struct RunDatabase {
    /// The server URL it was created through.
    admin_url: String,
    /// `bench_<random>`.
    pub name: String,
    /// The URL of the new database (the relay's `store.url`).
    pub url: String,
    /// `synchronous_commit` and `fsync` of the server, for the report.
    pub settings: String,
}

impl RunDatabase {
    /// Creates `bench_<random>` through `admin_url`.
    pub fn create(admin_url: &str) -> Result<RunDatabase, String> {
        let name = format!("bench_{:016x}", rand::random::<u64>());
        let settings = block_on(async {
            let client = connect(admin_url).await?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
            let mut shown = Vec::new();
            for setting in ["synchronous_commit", "fsync"] {
                let row = client
                    .query_one(&format!("SHOW {setting}"), &[])
                    .await
                    .map_err(|e| format!("SHOW {setting}: {e}"))?;
                shown.push(format!("{setting}={}", row.get::<_, String>(0)));
            }
            Ok::<_, String>(shown.join(", "))
        })?;
        Ok(RunDatabase {
            admin_url: admin_url.to_owned(),
            url: with_dbname(admin_url, &name),
            name,
            settings,
        })
    }
}

impl Drop for RunDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let result = block_on(async {
            let client = connect(&self.admin_url).await?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .map_err(|e| format!("DROP DATABASE {name}: {e}"))
        });
        if let Err(err) = result {
            eprintln!("relay-bench: {err}");
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("postgres runtime")
        .block_on(future)
}

/// `url` with its database replaced by `name`: the path of a
/// `postgres://…/db?…` URL, or a `dbname=` appended to a key=value string.
pub fn with_dbname(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return format!("{url} dbname={name}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn replaces_the_database() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_dbname("postgresql://u@h/db?sslmode=disable", "b"),
            "postgresql://u@h/b?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://u@h:1", "b"), "postgres://u@h:1/b");
        assert_eq!(with_dbname("host=h user=u", "b"), "host=h user=u dbname=b");
    }
}
