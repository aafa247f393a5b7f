//! A target that accepts connections and never answers (a hung service).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A target that accepts TCP connections and never answers (a hung service):
/// it reads and discards whatever arrives and holds each connection until the
/// client closes it or the listener is dropped.
pub struct HungListener {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl HungListener {
    /// Listens on an ephemeral loopback port.
    pub async fn start() -> HungListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hung = HungListener {
            addr: listener.local_addr().expect("addr"),
            accepted: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (accepted, stop) = (hung.accepted.clone(), hung.stop.clone());
        tokio::spawn(async move {
            loop {
                let mut stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    loop {
                        tokio::select! {
                            read = stream.read(&mut buffer) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            },
                            () = stop.cancelled() => return,
                        }
                    }
                });
            }
        });
        hung
    }

    /// A URL on this listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for HungListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
