//! Where the broker is: `NATS_URL` names one server or, for a cluster, a
//! comma-separated list of seed servers. A client connects to any seed that
//! answers and learns the rest of the cluster from it; when the server it is
//! connected to goes away it moves to another.

use async_nats::ServerAddr;

/// Most seeds a `NATS_URL` may list.
pub const MAX_SEEDS: usize = 16;

/// The seed servers of `url` (`nats://a:4222,nats://b:4222`), each checked.
pub fn seeds(url: &str) -> Result<Vec<ServerAddr>, String> {
    let parts: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        return Err("NATS_URL names no server".into());
    }
    if parts.len() > MAX_SEEDS {
        return Err(format!(
            "NATS_URL lists {} servers; at most {MAX_SEEDS}",
            parts.len()
        ));
    }
    parts
        .into_iter()
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| format!("NATS_URL: '{s}' is not a server address: {e}"))
        })
        .collect()
}

/// Connects with `options` to any seed of `url`.
pub async fn connect(
    options: async_nats::ConnectOptions,
    url: &str,
) -> anyhow::Result<async_nats::Client> {
    let seeds = seeds(url).map_err(anyhow::Error::msg)?;
    Ok(options.connect(seeds).await?)
}

/// `options` with a user and password, when both are given, and that
/// user's own inbox prefix ([`crate::permissions::inbox_prefix`]): the
/// only one it may subscribe to, so no user sees another's replies.
pub fn with_credentials(
    options: async_nats::ConnectOptions,
    user: Option<&str>,
    password: Option<&str>,
) -> async_nats::ConnectOptions {
    match (user, password) {
        (Some(user), Some(password)) => options
            .user_and_password(user.into(), password.into())
            .custom_inbox_prefix(crate::permissions::inbox_prefix(user)),
        _ => options,
    }
}

/// The broker's `max_payload` as it announced it (1 MiB if it did not).
pub fn max_payload(js: &async_nats::jetstream::Context) -> usize {
    match js.client().server_info().max_payload {
        0 => 1024 * 1024,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_or_a_list_of_seeds() {
        assert_eq!(seeds("nats://127.0.0.1:4222").unwrap().len(), 1);
        let list = seeds(" nats://a:4222, nats://b:4223 ,nats://c:4224,").unwrap();
        let ports: Vec<u16> = list.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert_eq!(list[1].host(), "b");
    }

    #[test]
    fn an_empty_an_overlong_or_a_malformed_list_is_refused() {
        assert!(seeds(" , ").unwrap_err().contains("no server"));
        let many = vec!["nats://a:1"; MAX_SEEDS + 1].join(",");
        assert!(seeds(&many).unwrap_err().contains("at most"));
        assert!(
            seeds("nats://a:4222,http://[::1")
                .unwrap_err()
                .contains("http://[::1")
        );
    }
}
