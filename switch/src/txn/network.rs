//! Network management, 0800 → 0810 (SPEC §3): sign-on `001`, sign-off `002`, echo `301`, and
//! key change `161`/`162` (handed to [`super::key_exchange`]).

use chrono::Utc;
use tracing::info;

use super::{Reply, key_exchange, response_to};
use crate::app::SwitchContext;
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::Message;
use crate::net::ConnState;
use crate::net::session::SessionHandle;
use crate::store::TerminalKind;

/// Handles an 0800.
pub async fn handle(ctx: &SwitchContext, conn: &mut ConnState, request: &Message) -> Option<Reply> {
    let answer = |code| response_to(request, code).map(|m| Reply::plain(m, "network"));
    let terminal = match request.get_str(41).map(TerminalId::from_field41) {
        Some(Ok(tid)) => tid,
        // Field 41 is mandatory in every 0800 of the profile.
        _ => return answer(ResponseCode::FormatError),
    };
    match request.get_str(70) {
        Some("001") => sign_on(ctx, conn, request, terminal).await,
        Some("002") => {
            if conn.terminal.as_ref() == Some(&terminal) {
                conn.terminal = None;
                conn.terminal_kind = None;
                if ctx.sessions.remove(&terminal, conn.conn_id) {
                    ctx.audit_session(&terminal, "session.sign-off", &conn.remote)
                        .await;
                }
            }
            answer(ResponseCode::Approved)
        }
        Some("301") => {
            // Echo keeps a session alive; from a connection that is not signed on as this
            // terminal it proves nothing, so it is refused like any other message.
            if conn.terminal.as_ref() == Some(&terminal) {
                answer(ResponseCode::Approved)
            } else {
                answer(ResponseCode::NotPermittedToTerminal)
            }
        }
        Some("161") | Some("162") => {
            if conn.terminal.as_ref() != Some(&terminal) {
                return answer(ResponseCode::NotPermittedToTerminal);
            }
            key_exchange::handle_request(ctx, &terminal, request).await
        }
        _ => answer(ResponseCode::InvalidTransaction),
    }
}

async fn sign_on(
    ctx: &SwitchContext,
    conn: &mut ConnState,
    request: &Message,
    terminal: TerminalId,
) -> Option<Reply> {
    let answer = |code| response_to(request, code).map(|m| Reply::plain(m, "network"));
    if ctx.health.is_draining() {
        // Shutting down: let the terminal sign on to another instance.
        return answer(ResponseCode::IssuerUnavailable);
    }
    let kind = match ctx.store.get_terminal(&terminal).await {
        Ok(Some(registered)) => registered.kind,
        Ok(None) => {
            info!(%terminal, remote = %conn.remote, "sign-on refused: terminal not registered");
            ctx.audit_session(&terminal, "session.sign-on-refused", &conn.remote)
                .await;
            return answer(ResponseCode::NotPermittedToTerminal);
        }
        Err(_) => return answer(ResponseCode::SystemMalfunction),
    };
    // The same connection signing on as another terminal gives up its previous session.
    if let Some(previous) = conn.terminal.take()
        && previous != terminal
    {
        ctx.sessions.remove(&previous, conn.conn_id);
    }
    // An ATM's new sign-on replaces its old connection; a station's replicas and drainers all
    // sign on with its id, so a station's sessions live side by side.
    let replaced = ctx.sessions.sign_on(
        terminal.clone(),
        kind,
        SessionHandle {
            conn_id: conn.conn_id,
            remote: conn.remote,
            signed_on_at: Utc::now(),
            last_seen: conn.last_seen.clone(),
            outbound: conn.outbound.clone(),
            close: conn.close.clone(),
        },
    );
    if let Some(old) = replaced.filter(|old| old.conn_id != conn.conn_id) {
        info!(%terminal, old = %old.remote, new = %conn.remote, "sign-on replaced an older session");
    }
    conn.terminal = Some(terminal.clone());
    conn.terminal_kind = Some(kind);
    ctx.audit_session(&terminal, "session.sign-on", &conn.remote)
        .await;
    // Keys generated while an ATM was away are pushed now, after this answer. A station
    // exchanges its keys itself (0800/161 + 162) and shares them among its processes; a key
    // pushed to one of its sessions would change them behind the others' backs.
    if kind == TerminalKind::Atm {
        key_exchange::push_pending(ctx, &terminal).await;
    }
    answer(ResponseCode::Approved)
}
