//! Credentials: basic auth and bearer tokens, compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::HttpAuth;
use crate::state::SharedState;

pub(super) async fn require_auth(State(state): State<Arc<SharedState>>, request: Request, next: Next) -> Response {
    let auth = state.auth();
    if !auth.is_required() || authorized(&auth, request.headers()) {
        return next.run(request).await;
    }
    let challenge = if auth.basic.is_some() {
        "Basic realm=\"lockjam\", charset=\"UTF-8\""
    } else {
        "Bearer realm=\"lockjam\""
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        "unauthorized: lockjam's /metrics and /api/* need the credentials of its [server] configuration\n",
    )
        .into_response()
}

/// Whether the request carries the configured basic credentials or bearer
/// token. Secrets are compared by their SHA-256 digests in constant time,
/// so that neither a secret's content nor its length shows in timing.
pub(super) fn authorized(auth: &HttpAuth, headers: &HeaderMap) -> bool {
    let Some((scheme, credentials)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
    else {
        return false;
    };
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return auth
            .bearer_token
            .as_ref()
            .is_some_and(|token| secrets_equal(credentials, &token.secret.0));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Some(basic) = &auth.basic else {
            return false;
        };
        let Some(decoded) = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
        else {
            return false;
        };
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        // Both comparisons run whichever fails, so that timing does not
        // tell a right user name from a wrong one.
        let user_ok = secrets_equal(user, &basic.user);
        let password_ok = secrets_equal(password, &basic.password.secret.0);
        return user_ok & password_ok;
    }
    false
}

fn secrets_equal(presented: &str, expected: &str) -> bool {
    let digest = |text: &str| ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest(presented).as_ref().ct_eq(digest(expected).as_ref()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicAuth, FileSecret, Secret};

    fn secret(text: &str) -> FileSecret {
        FileSecret {
            file: "/run/secrets/x".into(),
            secret: Secret(text.into()),
        }
    }

    fn with_header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn basic(user_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    #[test]
    fn credentials_are_checked_exactly() {
        let both = HttpAuth {
            basic: Some(BasicAuth {
                user: "prometheus".into(),
                password: secret("pass:word"),
            }),
            bearer_token: Some(secret("tok")),
        };
        let accepted = |auth: &HttpAuth, value: &str| authorized(auth, &with_header(value));
        assert!(
            accepted(&both, &basic("prometheus:pass:word")),
            "a password may hold ':'"
        );
        assert!(accepted(&both, "bearer tok"), "schemes are case-insensitive");
        assert!(accepted(&both, "Bearer  tok "));
        for refused in [
            basic("prometheus:pass:wor"),
            basic("prometheus:pass:word2"),
            basic("Prometheus:pass:word"),
            basic("prometheus"),
            basic(""),
            "Basic !!!not-base64".into(),
            "Bearer to".into(),
            "Bearer tokk".into(),
            "Bearer".into(),
            "Digest tok".into(),
            "tok".into(),
        ] {
            assert!(!accepted(&both, &refused), "{refused}");
        }
        assert!(!authorized(&both, &HeaderMap::new()));
        let token_only = HttpAuth {
            basic: None,
            bearer_token: Some(secret("tok")),
        };
        assert!(!accepted(&token_only, &basic("prometheus:tok")));
        assert!(!HttpAuth::default().is_required());
    }
}
