//! A browser the tests drive as a person would: headless Chromium through
//! chromedriver (Debian's `chromium-driver`), over the W3C WebDriver
//! protocol, which is plain HTTP and JSON. Typing and clicking go through
//! the browser's own input events.

use std::{io::Write, net::TcpStream, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::{DEADLINE, eventually};

/// How WebDriver names an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Longest any one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One browser session; ended (and its Chromium stopped) when dropped.
pub struct Browser {
    driver: tokio::process::Child,
    port: u16,
    session: String,
    http: reqwest::Client,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a port of its choosing and opens a session.
    pub async fn start() -> Result<Browser> {
        let bin = std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "chromedriver".into());
        let mut driver = tokio::process::Command::new(&bin)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("running {bin}: scripts/test.sh installs Debian's chromium-driver, or set CHROMEDRIVER_BIN")
            })?;
        let mut lines = BufReader::new(driver.stdout.take().expect("piped")).lines();
        let port = tokio::time::timeout(COMMAND_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                // "ChromeDriver was started successfully on port 35989."
                if let Some(rest) = line.split("successfully on port ").nth(1) {
                    return Ok(rest.trim_end_matches('.').trim().parse::<u16>()?);
                }
            }
            bail!("{bin} ended before it listened")
        })
        .await
        .context("chromedriver did not listen within 30 s")??;
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
        let http = reqwest::Client::builder()
            .timeout(COMMAND_TIMEOUT)
            .build()?;
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            http,
            profile,
        };
        let created = browser
            .command(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}),
            )
            .await?;
        browser.session = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {created}"))?
            .to_string();
        Ok(browser)
    }

    /// Sends one WebDriver command; its `value`, or the error it names.
    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let request = self.http.request(method.clone(), &url);
        let request = if method == reqwest::Method::GET {
            request
        } else {
            request.json(&body)
        };
        let answer = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = answer.status();
        let body: Value = answer
            .json()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let value = body.get("value").cloned().unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{method} {path}: {} ({})",
                value["error"].as_str().unwrap_or("error"),
                value["message"].as_str().unwrap_or_default()
            );
        }
        Ok(value)
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url` in the tab.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command(
            reqwest::Method::POST,
            &self.path("/url"),
            json!({ "url": url }),
        )
        .await
        .map(drop)
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn eval(&self, script: &str) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            &self.path("/execute/sync"),
            json!({ "script": script, "args": [] }),
        )
        .await
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
    async fn element(&self, css: &str) -> Result<String> {
        eventually(&format!("an element {css}"), DEADLINE, || async {
            let found = self
                .command(
                    reqwest::Method::POST,
                    &self.path("/elements"),
                    json!({"using": "css selector", "value": css}),
                )
                .await?;
            Ok(found
                .as_array()
                .and_then(|all| all.first())
                .and_then(|e| e[ELEMENT].as_str())
                .map(str::to_string))
        })
        .await
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.command(
            reqwest::Method::POST,
            &self.path(&format!("/element/{id}/click")),
            json!({}),
        )
        .await
        .map(drop)
    }

    /// Types `text` into the element `css` selects (after what it holds).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.command(
            reqwest::Method::POST,
            &self.path(&format!("/element/{id}/value")),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    /// The text the element `css` selects shows.
    pub async fn text(&self, css: &str) -> Result<String> {
        let id = self.element(css).await?;
        let v = self
            .command(
                reqwest::Method::GET,
                &self.path(&format!("/element/{id}/text")),
                Value::Null,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }
}

impl Drop for Browser {
    /// Ends the session so chromedriver stops its Chromium (a plain
    /// blocking request: there is no async drop), then chromedriver itself.
    fn drop(&mut self) {
        if !self.session.is_empty()
            && let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port))
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = std::io::Read::read_to_end(&mut stream, &mut Vec::new());
        }
        let _ = self.driver.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
