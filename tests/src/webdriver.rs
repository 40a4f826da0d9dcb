//! A browser the tests drive as a person would: headless Chromium through
//! chromedriver (Debian's `chromium-driver`), spoken to by fantoccini (the
//! W3C WebDriver protocol). Typing and clicking go through the browser's
//! own input events.

use std::{io::Write, net::TcpStream, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// What chromedriver prints, line by line.
type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;
use uuid::Uuid;

use crate::{DEADLINE, eventually};

/// Longest chromedriver may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One browser session; ended (and its Chromium stopped) when dropped.
pub struct Browser {
    driver: tokio::process::Child,
    port: u16,
    session: Option<String>,
    client: Client,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a port of its choosing and opens a session.
    pub async fn start() -> Result<Browser> {
        // Now and then chromedriver exits before it listens when several
        // start at once: it is started again, up to three times, and what
        // it said is in the error if it never listens.
        let mut said = Vec::new();
        let (driver, port, lines) = loop {
            match Browser::driver().await? {
                Ok(started) => break started,
                Err(why) if said.len() < 2 => said.push(why),
                Err(why) => {
                    said.push(why);
                    bail!(
                        "chromedriver ended before it listened, three times:\n{}",
                        said.join("\n")
                    );
                }
            }
        };
        Browser::session(driver, port, lines).await
    }

    /// chromedriver started, with the port it listens on and the rest of
    /// its output; or what it said before it ended without listening.
    async fn driver() -> Result<Result<(tokio::process::Child, u16, Lines), String>> {
        let bin = std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "chromedriver".into());
        let mut driver = tokio::process::Command::new(&bin)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("running {bin}: scripts/test.sh installs Debian's chromium-driver, or set CHROMEDRIVER_BIN")
            })?;
        let mut lines = BufReader::new(driver.stdout.take().expect("piped")).lines();
        let mut stderr = driver.stderr.take().expect("piped");
        let port = tokio::time::timeout(START_TIMEOUT, async {
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await? {
                // "ChromeDriver was started successfully on port 35989."
                if let Some(rest) = line.split("successfully on port ").nth(1) {
                    return Ok(Ok(rest.trim_end_matches('.').trim().parse::<u16>()?));
                }
                seen.push(line);
            }
            let mut errors = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors).await;
            let status = driver.wait().await?;
            anyhow::Ok(Err(format!(
                "{bin} ({status}): {} {}",
                seen.join(" / "),
                errors.trim()
            )))
        })
        .await
        .context("chromedriver did not listen within 30 s")??;
        // Its error output is read and dropped, so it never blocks on a full pipe.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        });
        Ok(port.map(|port| (driver, port, lines)))
    }

    /// A session on the chromedriver at `port`.
    async fn session(
        driver: tokio::process::Child,
        port: u16,
        mut lines: Lines,
    ) -> Result<Browser> {
        // What it logs later is read and dropped, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = std::env::temp_dir().join(format!("chromedriver-{}", Uuid::now_v7()));
        let mut options = json!({
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--window-size=1400,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        });
        if let Ok(chromium) = std::env::var("CHROMIUM_BIN") {
            options["binary"] = json!(chromium);
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("opening a chromedriver session")?;
        let session = client.session_id().await?;
        Ok(Browser {
            driver,
            port,
            session,
            client,
            profile,
        })
    }

    /// Opens `url` in the tab.
    pub async fn goto(&self, url: &str) -> Result<()> {
        Ok(self.client.goto(url).await?)
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn eval(&self, script: &str) -> Result<Value> {
        Ok(self.client.execute(script, Vec::new()).await?)
    }

    /// Polls `script` until it returns something other than null or false.
    pub async fn until(&self, what: &str, script: &str) -> Result<Value> {
        eventually(what, DEADLINE, || async {
            let v = self.eval(script).await?;
            Ok((!v.is_null() && v != Value::Bool(false)).then_some(v))
        })
        .await
    }

    /// The element `css` selects, once there is one.
    async fn element(&self, css: &str) -> Result<Element> {
        eventually(&format!("an element {css}"), DEADLINE, || async {
            Ok(self
                .client
                .find_all(Locator::Css(css))
                .await?
                .into_iter()
                .next())
        })
        .await
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) -> Result<()> {
        Ok(self.element(css).await?.click().await?)
    }

    /// Types `text` into the element `css` selects (after what it holds).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        Ok(self.element(css).await?.send_keys(text).await?)
    }

    /// The text the element `css` selects shows.
    pub async fn text(&self, css: &str) -> Result<String> {
        Ok(self.element(css).await?.text().await?)
    }
}

impl Drop for Browser {
    /// Ends the session so chromedriver stops its Chromium (a plain
    /// blocking request: there is no async drop), then chromedriver itself.
    fn drop(&mut self) {
        if let Some(session) = &self.session
            && let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port))
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = std::io::Read::read_to_end(&mut stream, &mut Vec::new());
        }
        let _ = self.driver.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
