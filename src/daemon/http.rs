//! The daemon's HTTP server: the status page, `/healthz`, `/metrics`, the
//! JSON API, server-sent events, and the actions. Everything it serves is
//! read from the status model; the actions go to the supervisor.
//!
//! | path | |
//! |---|---|
//! | `GET /` | the status page (one self-contained HTML file) |
//! | `GET /healthz` | 200 while the daemon runs, with its health in words |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/status` | the status model as JSON |
//! | `GET /api/backups` | the backups as JSON |
//! | `GET /api/events` | `text/event-stream`: an `event: status` with the model on each change |
//! | `POST /api/jobs/{backup,verify,drill}` | start the job; needs `Authorization: Bearer <token>` |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::jobs::JobKind;
use super::status::Hub;
use super::supervisor::{Control, StartError};

/// The status page.
const PAGE: &str = include_str!("page.html");

type Body = BoxBody<Bytes, Infallible>;

/// What the handlers share.
pub struct Server {
    /// The model.
    pub hub: Arc<Hub>,
    /// The actions' token (`None`: read-only).
    pub token: Option<String>,
    /// Starts jobs.
    pub control: Control,
}

/// Serve on `listener` until `cancel`.
pub async fn serve(listener: Arc<TcpListener>, server: Arc<Server>, cancel: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                let cancel = cancel.clone();
                async move { Ok::<_, Infallible>(handle(&server, req, cancel).await) }
            });
            // a client that never finishes its request headers is dropped
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = "no-store".parse() {
        r.headers_mut().insert(hyper::header::CACHE_CONTROL, v);
    }
    r
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Whether `req` carries the token (compared in constant time).
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn handle(
    server: &Server,
    req: Request<Incoming>,
    cancel: CancellationToken,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (&Method::GET, "/healthz") => {
            let s = server.hub.snapshot();
            full(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                format!("{}: {}\n", s.health.state, s.health.words),
            )
        }
        (&Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(&server.hub.snapshot()),
        ),
        (&Method::GET, "/api/status") => json(StatusCode::OK, &server.hub.snapshot()),
        (&Method::GET, "/api/backups") => json(StatusCode::OK, &server.hub.snapshot().backups),
        (&Method::GET, "/api/events") => events(server.hub.clone(), cancel),
        (&Method::POST, p) if p.starts_with("/api/jobs/") => {
            let Some(token) = &server.token else {
                return error(
                    StatusCode::FORBIDDEN,
                    "the daemon is read-only: no token is configured ([daemon] token_file)",
                );
            };
            if !authorized(&req, token) {
                let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                if let Ok(v) = "Bearer".parse() {
                    r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
            let kind = match p.trim_start_matches("/api/jobs/") {
                "backup" => JobKind::Backup,
                "verify" => JobKind::Verify,
                "drill" => JobKind::Drill,
                "files" => JobKind::Files,
                other => {
                    return error(
                        StatusCode::NOT_FOUND,
                        &format!("no job {other:?}: backup, verify, drill or files"),
                    )
                }
            };
            match server.control.start(kind, "manual", None) {
                Ok(run) => json(StatusCode::ACCEPTED, &serde_json::json!({ "run": run })),
                Err(StartError::Busy(why)) => error(StatusCode::CONFLICT, &why),
                Err(StartError::Unavailable(why)) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
            }
        }
        (&Method::GET | &Method::POST, _) => error(StatusCode::NOT_FOUND, "no such page"),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET (or POST for actions)",
        ),
    }
}

/// `text/event-stream` of the model: one event at once, then one per
/// change (at most four a second), a comment every 15 s to keep proxies
/// from closing it.
fn events(hub: Arc<Hub>, cancel: CancellationToken) -> Response<Body> {
    let rx = hub.subscribe();
    let first = true;
    let stream = futures::stream::unfold(
        (hub, rx, first, cancel),
        |(hub, mut rx, first, cancel)| async move {
            if !first {
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    r = tokio::time::timeout(Duration::from_secs(15), rx.changed()) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None,
                        Err(_) => {
                            let f = Frame::data(Bytes::from_static(b": keep-alive\n\n"));
                            return Some((Ok::<_, Infallible>(f), (hub, rx, false, cancel)));
                        }
                    },
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            rx.borrow_and_update();
            let body = serde_json::to_string(&hub.snapshot()).unwrap_or_default();
            let f = Frame::data(Bytes::from(format!("event: status\ndata: {body}\n\n")));
            Some((Ok(f), (hub, rx, false, cancel)))
        },
    );
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    for (k, v) in [
        (hyper::header::CONTENT_TYPE, "text/event-stream"),
        (hyper::header::CACHE_CONTROL, "no-store"),
    ] {
        if let Ok(v) = v.parse() {
            r.headers_mut().insert(k, v);
        }
    }
    r
}
