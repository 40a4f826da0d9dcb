//! What went wrong, as sagactl's exit code tells a script (the table is in
//! docs/operating.md#sagactl-exit-codes):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | any other failure (a redrive refused, the broker refused an event) |
//! | 2 | usage: the command line, or a file it names, cannot be used |
//! | 3 | connection: the broker, the order service or a database did not answer |
//! | 4 | authorization: the admin token or broker identity is missing or refused |
//! | 5 | the audit found records that disagree |
//! | 6 | nothing found: no such dead letter, saga or order, or none selected |

use serde_json::json;

/// A failure a caller branches on; anything else exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0} mismatch(es) between the services' records")]
    Mismatch(usize),
    #[error("{0}")]
    NotFound(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::Unauthorized(_) => 4,
            Failure::Mismatch(_) => 5,
            Failure::NotFound(_) => 6,
        }
    }

    /// Its name in `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Usage(_) => "usage",
            Failure::Unreachable(_) => "unreachable",
            Failure::Unauthorized(_) => "unauthorized",
            Failure::Mismatch(_) => "mismatch",
            Failure::NotFound(_) => "not_found",
        }
    }
}

/// The failure an error is (or was caused by), if it is one of those.
pub fn failure_of(error: &anyhow::Error) -> Option<&Failure> {
    error.chain().find_map(|e| e.downcast_ref::<Failure>())
}

/// The exit code for `error`.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    failure_of(error).map_or(1, Failure::exit_code)
}

/// `error` as `--json` prints it on stderr.
pub fn as_json(error: &anyhow::Error) -> serde_json::Value {
    json!({
        "error": {
            "kind": failure_of(error).map_or("failed", Failure::kind),
            "message": format!("{error:#}"),
            "exitCode": exit_code(error),
        }
    })
}

/// A failed HTTP call as a failure: no answer (connection refused, timed
/// out) is `Unreachable`; anything else is left as it is.
pub fn of_request(error: reqwest::Error, what: &str) -> anyhow::Error {
    if error.is_connect() || error.is_timeout() {
        return Failure::Unreachable(format!("{what}: {error}")).into();
    }
    anyhow::Error::new(error).context(what.to_string())
}

/// A refused HTTP answer as a failure: 401 and 403 `Unauthorized`, 404
/// `NotFound`, anything else left as it is.
pub fn of_status(status: reqwest::StatusCode, message: String) -> anyhow::Error {
    match status.as_u16() {
        401 | 403 => Failure::Unauthorized(message).into(),
        404 => Failure::NotFound(message).into(),
        _ => anyhow::anyhow!(message),
    }
}

/// A failed connection to the broker: refused credentials are
/// `Unauthorized`, anything else `Unreachable`.
pub fn of_broker(error: anyhow::Error, url: &str) -> anyhow::Error {
    let refused = error
        .downcast_ref::<async_nats::ConnectError>()
        .is_some_and(|e| e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation);
    match refused {
        true => Failure::Unauthorized(format!("{url} refused the broker user: {error}")).into(),
        false => Failure::Unreachable(format!("connecting to {url}: {error:#}")).into(),
    }
}

/// A failed connection to a database: refused credentials (SQLSTATE
/// class 28) are `Unauthorized`, anything else `Unreachable`.
pub fn of_database(error: sqlx::Error, what: &str) -> anyhow::Error {
    let refused = error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("28"));
    match refused {
        true => Failure::Unauthorized(format!("{what}: {error}")).into(),
        false => Failure::Unreachable(format!("{what}: {error}")).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_failure_has_its_code_through_any_context() {
        let cases = [
            (Failure::Usage("x".into()), 2),
            (Failure::Unreachable("x".into()), 3),
            (Failure::Unauthorized("x".into()), 4),
            (Failure::Mismatch(2), 5),
            (Failure::NotFound("x".into()), 6),
        ];
        for (failure, code) in cases {
            let kind = failure.kind();
            let error = Err::<(), _>(anyhow::Error::from(failure))
                .context("while doing something")
                .unwrap_err();
            assert_eq!(exit_code(&error), code);
            assert_eq!(as_json(&error)["error"]["kind"], kind);
            assert_eq!(as_json(&error)["error"]["exitCode"], code);
        }
        assert_eq!(exit_code(&anyhow::anyhow!("a redrive refused")), 1);
    }

    #[test]
    fn refusals_by_status_are_told_apart() {
        let code = |s: u16| exit_code(&of_status(s.try_into().unwrap(), "m".into()));
        assert_eq!((code(401), code(403), code(404), code(500)), (4, 4, 6, 1));
    }
}
