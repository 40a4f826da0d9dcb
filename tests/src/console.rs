//! The operator console (`sagactl console`) beside a test's stack, in
//! this process: the order service's page is told where it is, and it
//! redrives under the stack's operator identity.

use anyhow::{Context, Result};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{ADMIN_TOKEN, Stack};

/// A console serving until dropped.
pub struct Console {
    /// Its origin, as the page calls it (`http://127.0.0.1:PORT`).
    pub url: String,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<()>>>,
}

/// Where a console will listen, before the order service that must name
/// it is started.
pub struct Reserved {
    listener: TcpListener,
    pub url: String,
}

/// A port for a console, on loopback.
pub async fn reserve() -> Result<Reserved> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok(Reserved { listener, url })
}

impl Stack {
    /// The console on `at`, as the operator, asking this stack's order
    /// service about sagas and admitting its page's origin.
    pub async fn start_console(&self, at: Reserved) -> Result<Console> {
        let (user, password) = self.users.operator();
        let order = self.url("order", "");
        let connection = sagactl::Connection {
            nats_url: self.nats.url(),
            nats_user: Some(user.clone()),
            nats_password: Some(password.clone()),
            subject_prefix: self.prefix.clone(),
            order_url: order.clone(),
            admin_token_file: None,
            admin_token: Some(ADMIN_TOKEN.to_string()),
        };
        let nats = common::broker::connect(
            self.users.as_operator(async_nats::ConnectOptions::new()),
            &self.nats.url(),
        )
        .await
        .context("connect the console")?;
        let console = sagactl::console::Console::new(nats, &connection)?;
        let shutdown = CancellationToken::new();
        let origins = vec![common::http::origin(&order).map_err(anyhow::Error::msg)?];
        let stop = shutdown.clone();
        let handle = tokio::spawn(async move {
            sagactl::console::serve(console, at.listener, &origins, stop).await
        });
        Ok(Console {
            url: at.url,
            shutdown,
            handle: Some(handle),
        })
    }
}

impl Console {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Stops it, and says whether it served without an error.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.handle.take() {
            Some(handle) => handle.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
