//! A NATS client speaking the plain text protocol over a socket, byte for byte
//! what the `nats` CLI sends for `nats pub` (PUB/HPUB) and `nats req`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

pub struct RawNats {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    next_sid: u64,
}

impl RawNats {
    /// Connects and performs the handshake (INFO, CONNECT with headers, PING/PONG),
    /// as the user a `nats://user:password@host:port` URL names, as the
    /// `nats` CLI does.
    pub async fn connect(url: &str) -> Result<RawNats> {
        let rest = url.trim_start_matches("nats://");
        let (credentials, addr) = match rest.rsplit_once('@') {
            Some((userinfo, addr)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (
                    format!(
                        ",\"user\":{},\"pass\":{}",
                        serde_json::json!(user),
                        serde_json::json!(pass)
                    ),
                    addr,
                )
            }
            None => (String::new(), rest),
        };
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (r, w) = stream.into_split();
        let mut c = RawNats {
            reader: BufReader::new(r),
            writer: w,
            next_sid: 1,
        };
        let info = c.line().await?;
        anyhow::ensure!(info.starts_with("INFO "), "expected INFO, got {info}");
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1,\"name\":\"NATS CLI\",\"lang\":\"go\"{credentials}}}\r\nPING\r\n"
        );
        c.send(connect.as_bytes()).await?;
        c.expect_pong().await?;
        Ok(c)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await??;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(line.trim_end().to_string())
    }

    async fn expect_pong(&mut self) -> Result<()> {
        loop {
            let l = self.line().await?;
            match l.as_str() {
                "PONG" => return Ok(()),
                "PING" => self.send(b"PONG\r\n").await?,
                l if l.starts_with("-ERR") => bail!("server error: {l}"),
                _ => {}
            }
        }
    }

    /// `nats pub SUBJECT BODY`: `PUB <subject> <len>\r\n<body>\r\n`.
    pub async fn publish(&mut self, subject: &str, body: &[u8]) -> Result<()> {
        let frame = format!("PUB {subject} {}\r\n", body.len()).into_bytes();
        self.send_acknowledged(frame, body).await
    }

    /// Sends `frame` + `body` + CRLF, then a PING, and waits for the PONG:
    /// the server has processed the message by then (or said why not).
    async fn send_acknowledged(&mut self, mut frame: Vec<u8>, body: &[u8]) -> Result<()> {
        frame.extend_from_slice(body);
        frame.extend_from_slice(b"\r\nPING\r\n");
        self.send(&frame).await?;
        self.expect_pong().await
    }

    /// `nats pub -H 'K:V' SUBJECT BODY`: `HPUB <subject> <hdr len> <total len>\r\nNATS/1.0\r\nK: V\r\n\r\n<body>\r\n`.
    pub async fn publish_with_headers(
        &mut self,
        subject: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<()> {
        let mut hdr = String::from("NATS/1.0\r\n");
        for (k, v) in headers {
            hdr.push_str(&format!("{k}: {v}\r\n"));
        }
        hdr.push_str("\r\n");
        let mut frame = format!(
            "HPUB {subject} {} {}\r\n",
            hdr.len(),
            hdr.len() + body.len()
        )
        .into_bytes();
        frame.extend_from_slice(hdr.as_bytes());
        self.send_acknowledged(frame, body).await
    }

    /// `nats req SUBJECT BODY`: subscribe to an inbox, publish with it as the
    /// reply subject, read one MSG/HMSG back. Returns (headers block, body).
    pub async fn request(
        &mut self,
        subject: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(String, Vec<u8>)> {
        self.request_with_headers(subject, &[], body, timeout).await
    }

    /// `nats req -H 'K:V' SUBJECT BODY`: as [`Self::request`], with the
    /// request sent as `HPUB <subject> <inbox> <hdr len> <total len>`.
    pub async fn request_with_headers(
        &mut self,
        subject: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<(String, Vec<u8>)> {
        let inbox = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
        let sid = self.next_sid;
        self.next_sid += 1;
        // One reply wanted: auto-unsubscribe after it, as the CLI does.
        let mut frame = format!("SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\n").into_bytes();
        if headers.is_empty() {
            frame.extend_from_slice(format!("PUB {subject} {inbox} {}\r\n", body.len()).as_bytes());
        } else {
            let mut hdr = String::from("NATS/1.0\r\n");
            for (k, v) in headers {
                hdr.push_str(&format!("{k}: {v}\r\n"));
            }
            hdr.push_str("\r\n");
            frame.extend_from_slice(
                format!(
                    "HPUB {subject} {inbox} {} {}\r\n{hdr}",
                    hdr.len(),
                    hdr.len() + body.len()
                )
                .as_bytes(),
            );
        }
        frame.extend_from_slice(body);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame).await?;
        tokio::time::timeout(timeout, async {
            loop {
                let l = self.line().await?;
                let parts: Vec<&str> = l.split_whitespace().collect();
                match parts.first().copied() {
                    Some("PING") => self.send(b"PONG\r\n").await?,
                    Some("MSG") => {
                        let len: usize = parts.last().context("MSG length")?.parse()?;
                        let payload = self.read_payload(len).await?;
                        return Ok((String::new(), payload));
                    }
                    Some("HMSG") => {
                        let total: usize = parts[parts.len() - 1].parse()?;
                        let hdr_len: usize = parts[parts.len() - 2].parse()?;
                        let all = self.read_payload(total).await?;
                        let headers = String::from_utf8_lossy(&all[..hdr_len]).to_string();
                        if headers.contains("503") {
                            bail!("no responders for {subject}");
                        }
                        return Ok((headers, all[hdr_len..].to_vec()));
                    }
                    Some("-ERR") => bail!("server error: {l}"),
                    _ => {}
                }
            }
        })
        .await
        .context("no reply before the deadline")?
    }

    async fn read_payload(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len + 2];
        self.reader.read_exact(&mut buf).await?;
        buf.truncate(len);
        Ok(buf)
    }
}
