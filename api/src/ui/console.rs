//! `GET /api/vms/{name}/console/ws`: a VM's serial console over a WebSocket, for xterm.js.
//!
//! The transport, in one place so that it can change when VMs report their console as a
//! stream of their own: today the service keeps each run's console output in a log read by
//! byte offset ([`Service::vm_console`]), so this module reads from where it left off, every
//! [`POLL_RUNNING`] while the VM runs and every [`POLL_IDLE`] otherwise, and forwards new
//! bytes at once.
//!
//! Frames from the server: binary frames are console output (the guest's bytes); text frames
//! are JSON notices — `{"state": "running"}` when the VM's state changes, `{"notice": …}`,
//! `{"error": …}` before closing. The guest's serial input is not connected yet: bytes the
//! browser sends are answered with a notice saying so. The socket closes when the session or
//! token that opened it is no longer valid, the VM is removed, or the server stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Extension;
use strata_service::vms::{ConsoleQuery, VmState};
use strata_service::Service;

use super::ServerFacts;
use crate::server::Caller;

/// Output sent first: the tail of the log.
pub const INITIAL_TAIL: u64 = 64 << 10;
/// Most bytes read per poll.
const READ_LIMIT: u64 = 256 << 10;
/// Time between reads while the VM runs.
pub const POLL_RUNNING: Duration = Duration::from_millis(100);
/// Time between reads otherwise.
pub const POLL_IDLE: Duration = Duration::from_secs(1);
/// How often the credential is checked again.
const RECHECK: Duration = Duration::from_secs(2);

/// Upgrades to the console WebSocket.
pub(crate) async fn stream(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
    caller: Option<Extension<Caller>>,
    facts: Option<Extension<ServerFacts>>,
    ws: WebSocketUpgrade,
) -> crate::server::ApiResult<Response> {
    // Refuse unknown VMs before upgrading, with an ordinary error.
    let n = name.clone();
    crate::server::blocking(&svc, move |s| s.vm_status(&n)).await?;
    let caller = caller.map(|Extension(c)| c);
    let stopping = facts.map(|Extension(f)| f.stopping).unwrap_or_default();
    Ok(ws
        .max_message_size(64 << 10)
        .on_upgrade(move |socket| run(socket, svc, name, caller, stopping)))
}

fn notice(key: &str, text: &str) -> Message {
    Message::Text(serde_json::json!({ key: text }).to_string().into())
}

async fn run(
    mut socket: WebSocket,
    svc: Arc<Service>,
    name: String,
    caller: Option<Caller>,
    stopping: tokio_util::sync::CancellationToken,
) {
    let mut query = ConsoleQuery {
        offset: None,
        tail: Some(INITIAL_TAIL),
        limit: Some(READ_LIMIT),
    };
    let mut last_state: Option<VmState> = None;
    let mut checked = Instant::now();
    let mut told_input = false;
    loop {
        if checked.elapsed() >= RECHECK {
            checked = Instant::now();
            if caller.as_ref().is_some_and(|c| !c.still_valid(&svc)) {
                let _ = socket.send(notice("error", "Signed out")).await;
                break;
            }
        }
        let (svc2, n, q) = (svc.clone(), name.clone(), query.clone());
        let chunk = match tokio::task::spawn_blocking(move || svc2.vm_console(&n, &q)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let _ = socket.send(notice("error", &e.to_string())).await;
                break;
            }
            Err(_) => break,
        };
        if last_state != Some(chunk.state) {
            last_state = Some(chunk.state);
            let state = serde_json::to_value(chunk.state).unwrap_or_default();
            let msg = serde_json::json!({ "state": state }).to_string();
            if socket.send(Message::Text(msg.into())).await.is_err() {
                break;
            }
        }
        let got = !chunk.data.is_empty();
        if got
            && socket
                .send(Message::Binary(chunk.data.into_bytes().into()))
                .await
                .is_err()
        {
            break;
        }
        query = ConsoleQuery {
            offset: Some(chunk.next_offset),
            tail: None,
            limit: Some(READ_LIMIT),
        };
        let wait = if got {
            Duration::ZERO
        } else if chunk.state == VmState::Running {
            POLL_RUNNING
        } else {
            POLL_IDLE
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping.cancelled() => break,
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(_) | Message::Binary(_))) if !told_input => {
                    told_input = true;
                    let _ = socket
                        .send(notice("notice", "Typing into the console is not supported yet: the serial console is output only"))
                        .await;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
