//! The transaction layer: one ISO 8583 request in, at most one answer out.
//!
//! Dispatch by MTI; network management (0800), key exchange (0800/161, 162 and the terminal's
//! 0810 to a server-initiated 161), financial requests (0200), advices from acquirer stations
//! (0220/0221), reversals (0400, 0420/0421).
//! Every path ends in an answer with a documented response code or a closed connection; nothing
//! here panics on network input.

pub mod advice;
pub mod authorize;
mod context;
pub mod fleet;
pub mod key_exchange;
pub mod keys;
pub mod network;
pub mod posting;
pub mod request;
pub mod reversal;
pub mod routed;

use std::time::{Instant, SystemTime};

use tracing::{Instrument, debug, field, info_span, warn};

use crate::domain::{ResponseCode, TerminalId, WrappedKey};
use crate::iso8583::{Message, Mti, UnpackError};
use crate::iso8583::{fields, private_data};
use crate::net::{ConnState, FrameHandler};
use crate::store::{StoreError, TerminalKind};
use crate::telemetry;
pub use context::SwitchContext;
use request::Request;

/// An answer, and the TAK to MAC it under when it must carry a MAC.
#[derive(Debug)]
pub struct Reply {
    /// The response message (field 39 set).
    pub message: Message,
    /// MAC the answer under this key (financial answers to authenticated requests).
    pub mac_key: Option<WrappedKey>,
    /// Latency label for `switchyard_transaction_duration_seconds{type}`.
    pub kind: &'static str,
}

impl Reply {
    /// An answer without a MAC.
    pub fn plain(message: Message, kind: &'static str) -> Self {
        Self {
            message,
            mac_key: None,
            kind,
        }
    }
}

/// Fields echoed from a request into its answer (SPEC §3). Track 2 (35) and the PIN block
/// (123) are deliberately not echoed: an answer never carries more card data than it needs.
const ECHOED_FIELDS: &[u8] = &[
    fields::PAN,
    fields::PROCESSING_CODE,
    fields::AMOUNT,
    fields::TRANSMISSION_DATE_TIME,
    fields::STAN,
    fields::LOCAL_TIME,
    fields::LOCAL_DATE,
    fields::EXPIRY,
    fields::POS_ENTRY_MODE,
    fields::ACQUIRER_ID,
    fields::RRN,
    fields::TERMINAL_ID,
    fields::CARD_ACCEPTOR_ID,
    fields::CURRENCY,
    fields::NETWORK_CODE,
    fields::ORIGINAL_DATA,
];

/// The answer skeleton for `request`: response MTI, echoed fields, field 39.
pub fn response_to(request: &Message, code: ResponseCode) -> Option<Message> {
    let mti = request.mti().response()?;
    let mut out = Message::new(mti);
    for &field in ECHOED_FIELDS {
        if let Some(value) = request.get(field) {
            // Track 2 carries the PAN and expiry; answer with field 2 instead of echoing it.
            out.set(field, value);
        }
    }
    out.set_str(fields::RESPONSE_CODE, code.as_str());
    Some(out)
}

/// The transaction layer as the channel sees it.
#[async_trait::async_trait]
impl FrameHandler for SwitchContext {
    async fn handle_frame(&self, conn: &mut ConnState, frame: &[u8]) -> Option<Vec<u8>> {
        handle_frame(self, conn, frame).await
    }

    fn runs_concurrently(&self, conn: &ConnState, frame: &[u8]) -> bool {
        conn.terminal_kind == Some(TerminalKind::Station) && is_financial(frame)
    }

    async fn connection_closed(&self, conn: &mut ConnState) {
        if let Some(terminal) = conn.terminal.take() {
            if self.sessions.remove(&terminal, conn.conn_id) {
                self.audit_session(&terminal, "session.disconnect", &conn.remote)
                    .await;
            }
            // whether or not it was still current here: the registry row is this connection's
            self.fleet.session_ended(self, conn.conn_id).await;
        }
    }
}

/// Handles one frame. Returns the bytes to send back, if any.
pub async fn handle_frame(
    ctx: &SwitchContext,
    conn: &mut ConnState,
    frame: &[u8],
) -> Option<Vec<u8>> {
    let started = Instant::now();
    // One trace per request (SPEC §8): this span and its children decode, authenticate, pin,
    // store, upstream and answer. Its attributes never hold more of the card than the masked
    // PAN; no PIN block, key or MAC is recorded anywhere.
    let span = info_span!(
        "iso8583.request",
        otel.kind = "server",
        mti = field::Empty,
        processing_code = field::Empty,
        stan = field::Empty,
        terminal_id = field::Empty,
        pan = field::Empty,
        response_code = field::Empty,
        conn_id = conn.conn_id,
    );
    let decode_start = SystemTime::now();
    let decoded = ctx.packager.unpack(frame);
    let decode_end = SystemTime::now();
    if let Ok(request) = &decoded {
        continue_acquirer_trace(conn, request, &span);
    }
    telemetry::record_span(
        &span,
        "decode",
        decode_start,
        decode_end,
        vec![opentelemetry::KeyValue::new("ok", decoded.is_ok())],
    );
    let request = match decoded {
        Ok(m) => m,
        Err(err) => {
            let answer = span.in_scope(|| format_error(ctx, conn, err));
            span.record(
                "response_code",
                answer.as_ref().map(|_| "30").unwrap_or("none"),
            );
            return answer;
        }
    };
    record_request(&span, &request);
    let mti = request.mti();
    let reply = dispatch(ctx, conn, &request, frame)
        .instrument(span.clone())
        .await;
    let Some(reply) = reply else {
        // A request we cannot even answer (e.g. a response MTI we did not expect).
        ctx.metrics.message(mti.as_str(), None);
        return None;
    };
    let code = reply
        .message
        .get_str(fields::RESPONSE_CODE)
        .map(str::to_string);
    if let Some(code) = &code {
        span.record("response_code", code.as_str());
    }
    let packed = {
        let _answer = info_span!(parent: &span, "answer", mac = reply.mac_key.is_some()).entered();
        pack_reply(ctx, reply.message, reply.mac_key.as_ref())
    };
    let bytes = match packed {
        Ok(bytes) => bytes,
        Err(err) => {
            let _in = span.enter();
            warn!(mti = %mti.as_str(), error = %err, "failed to pack an answer; closing the connection");
            conn.close_after_reply = true;
            return None;
        }
    };
    ctx.metrics.message(mti.as_str(), code.as_deref());
    ctx.metrics.observe_duration(
        reply.kind,
        started.elapsed().as_secs_f64(),
        telemetry::sampled_trace_id(&span),
    );
    Some(bytes)
}

/// The request's attributes on its span: MTI, processing code, STAN, terminal id and the
/// masked PAN (from field 2 or track 2), never more of the card.
fn record_request(span: &tracing::Span, request: &Message) {
    span.record("mti", request.mti().as_str());
    if let Some(code) = request.get_str(fields::PROCESSING_CODE) {
        span.record("processing_code", code);
    }
    if let Some(stan) = request.get_str(fields::STAN) {
        span.record("stan", stan);
    }
    if let Some(tid) = request.get_str(fields::TERMINAL_ID) {
        span.record("terminal_id", tid.trim_end());
    }
    if let Some((pan, _)) = authorize::card_data(request) {
        span.record("pan", crate::domain::mask_pan(&pan).as_str());
    }
}

/// A financial request from an acquirer station may carry the acquirer's W3C `traceparent` in
/// field 48 (`TP`): then this request's span continues that trace. Only stations' requests:
/// an ATM has no trace to continue, and what it sends in 48 is not trusted for this.
fn continue_acquirer_trace(conn: &ConnState, request: &Message, span: &tracing::Span) {
    if conn.terminal_kind != Some(TerminalKind::Station)
        || !is_financial(request.mti().as_str().as_bytes())
    {
        return;
    }
    let traceparent = request
        .get_str(fields::PRIVATE_DATA)
        .and_then(|f| private_data::find(f, private_data::TRACEPARENT));
    if let Some(traceparent) = traceparent {
        telemetry::continue_trace(span, traceparent);
    }
}

/// Routes a decoded request to its handler.
async fn dispatch(
    ctx: &SwitchContext,
    conn: &mut ConnState,
    request: &Message,
    frame: &[u8],
) -> Option<Reply> {
    match Request::from_message(request) {
        Request::Network(action) => network::handle(ctx, conn, action, request, frame).await,
        Request::PushAnswer => {
            key_exchange::on_terminal_answer(ctx, conn, request, frame).await;
            None
        }
        Request::Financial(read) => match signed_on_terminal(conn, request) {
            Err(code) => refuse(request, code, "financial"),
            Ok(tid) => match read {
                Ok(fin) => authorize::handle(ctx, &tid, &fin, request, frame).await,
                Err(refused) => refuse(request, refused.code, refused.kind),
            },
        },
        Request::Advice(read) => match signed_on_terminal(conn, request) {
            Err(code) => refuse(request, code, "advice"),
            // Only an acquiring switch books cash it paid out on our behalf.
            Ok(_) if conn.terminal_kind != Some(TerminalKind::Station) => {
                refuse(request, ResponseCode::InvalidTransaction, "advice")
            }
            Ok(tid) => match read {
                Ok(booking) => advice::handle(ctx, &tid, &booking, request, frame).await,
                Err(refused) => refuse(request, refused.code, refused.kind),
            },
        },
        Request::Reversal(read) => match signed_on_terminal(conn, request) {
            Err(code) => refuse(request, code, "reversal"),
            Ok(tid) => match read {
                Ok(reversal) => reversal::handle(ctx, &tid, &reversal, request, frame).await,
                Err(refused) => refuse(request, refused.code, refused.kind),
            },
        },
        Request::Unsupported => refuse(request, ResponseCode::InvalidTransaction, "other"),
    }
}

fn refuse(request: &Message, code: ResponseCode, kind: &'static str) -> Option<Reply> {
    response_to(request, code).map(|m| Reply::plain(m, kind))
}

/// The terminal a financial request may act for: signed on over this connection, and naming
/// itself in field 41. Anything else is `58`.
fn signed_on_terminal(conn: &ConnState, request: &Message) -> Result<TerminalId, ResponseCode> {
    let Some(tid) = &conn.terminal else {
        return Err(ResponseCode::NotPermittedToTerminal);
    };
    match request
        .get_str(fields::TERMINAL_ID)
        .map(TerminalId::from_field41)
    {
        Some(Ok(named)) if &named == tid => Ok(tid.clone()),
        _ => Err(ResponseCode::NotPermittedToTerminal),
    }
}

/// Packs an answer, computing its MAC under `mac_key` when given (SPEC §3: over the packed
/// message up to the MAC field, with the MAC bit set).
pub fn pack_reply(
    ctx: &SwitchContext,
    mut message: Message,
    mac_key: Option<&WrappedKey>,
) -> Result<Vec<u8>, String> {
    if let Some(tak) = mac_key {
        let field = crate::iso8583::mac_field_for(&message);
        message.set(field, vec![0u8; 8]);
        let input = ctx
            .packager
            .pack_mac_input(&message)
            .map_err(|e| e.to_string())?;
        let mac = ctx
            .hsm
            .generate_mac(tak, &input)
            .map_err(|e| e.to_string())?;
        message.set(field, mac);
    }
    ctx.packager.pack(&message).map_err(|e| e.to_string())
}

/// A message that did not parse: answer `30` if we got far enough to know what it was and whom
/// to answer, else close the connection.
fn format_error(ctx: &SwitchContext, conn: &mut ConnState, err: UnpackError) -> Option<Vec<u8>> {
    ctx.metrics.frame_error("malformed");
    debug!(conn_id = conn.conn_id, error = %err, "unparseable message");
    let answer = err
        .partial
        .as_deref()
        .filter(|m| is_request(m.mti()))
        .and_then(|m| response_to(m, ResponseCode::FormatError));
    match answer.map(|m| ctx.packager.pack(&m)) {
        Some(Ok(bytes)) => {
            let mti = err.partial.as_deref().map(|m| m.mti());
            ctx.metrics.message(
                mti.as_ref().map(|m| m.as_str()).unwrap_or("unknown"),
                Some(ResponseCode::FormatError.as_str()),
            );
            Some(bytes)
        }
        _ => {
            conn.close_after_reply = true;
            None
        }
    }
}

/// Whether a frame is a financial request or advice (by its ASCII MTI, which both packagers
/// share): what a station's connection may process concurrently.
pub fn is_financial(frame: &[u8]) -> bool {
    matches!(
        frame.get(..4),
        Some(b"0200" | b"0220" | b"0221" | b"0400" | b"0420" | b"0421")
    )
}

fn is_request(mti: Mti) -> bool {
    matches!(
        mti.as_str(),
        "0800" | "0200" | "0220" | "0221" | "0400" | "0420" | "0421"
    )
}

/// Outcome of checking a request's MAC.
#[derive(Debug)]
pub enum MacCheck {
    /// Verified (under the ACTIVE TAK or one in grace); answer under this TAK, the ACTIVE one.
    Valid(Option<WrappedKey>),
    /// Missing, malformed, no key verifies it, or it verifies only under a TAK in grace while
    /// no TAK is ACTIVE (nothing to answer under): `63`.
    Invalid,
    /// The store failed: `96`.
    Unavailable,
}

/// Authenticates a received financial message (SPEC §3): `Ok` with the TAK to MAC the answer
/// under, or the code to answer without a MAC — `63` (counted and audited) when the MAC does
/// not verify, `96` when the store could not say.
pub async fn authenticate(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    raw: &[u8],
) -> Result<Option<WrappedKey>, ResponseCode> {
    let span = info_span!("authenticate", mac_valid = field::Empty);
    let checked = verify_request_mac(ctx, terminal, request, raw)
        .instrument(span.clone())
        .await;
    span.record("mac_valid", matches!(checked, MacCheck::Valid(_)));
    match checked {
        MacCheck::Valid(tak) => Ok(tak),
        MacCheck::Invalid => {
            ctx.metrics.mac_failures.inc();
            audit_mac_failure(ctx, terminal, request).await;
            Err(ResponseCode::SecurityViolation)
        }
        MacCheck::Unavailable => Err(ResponseCode::SystemMalfunction),
    }
}

async fn audit_mac_failure(ctx: &SwitchContext, terminal: &TerminalId, request: &Message) {
    warn!(%terminal, mti = %request.mti().as_str(), "MAC verification failed");
    let entry = crate::store::NewAudit {
        actor: format!("terminal:{terminal}"),
        action: "message.mac".into(),
        target: terminal.to_string(),
        result: "refused: MAC does not verify (63)".into(),
        detail: serde_json::json!({
            "mti": request.mti().as_str(),
            "stan": request.get_str(fields::STAN),
        }),
    };
    if let Err(StoreError::Unavailable(_)) = ctx.store.append_audit(&entry).await {
        warn!(%terminal, "failed to audit a MAC failure: store unavailable");
    }
}

/// Verifies the MAC of a received financial message under the terminal's ACTIVE TAK, or a
/// replaced TAK still inside its grace window (SPEC §4), and names the key to answer under:
/// always the ACTIVE TAK (NIST SP 800-57: a key past ACTIVE only verifies). The MAC input is
/// the received bytes up to the MAC field, which is always the last field.
pub async fn verify_request_mac(
    ctx: &SwitchContext,
    terminal: &TerminalId,
    request: &Message,
    raw: &[u8],
) -> MacCheck {
    let Ok((input, mac)) = ctx.packager.received_mac(raw, request) else {
        return MacCheck::Invalid;
    };
    let now = chrono::Utc::now();
    let tak = crate::domain::KeyType::Tak;
    let mut lookup = match ctx
        .keys
        .usable(ctx.store.as_ref(), terminal, tak, now)
        .await
    {
        Ok(l) => l,
        Err(_) => return MacCheck::Unavailable,
    };
    loop {
        let keys = &lookup.keys;
        let candidates = keys.active.iter().chain(keys.in_grace.iter());
        for key in candidates {
            if let Ok(true) = ctx.hsm.verify_mac(&key.wrapped, input, mac) {
                // NIST SP 800-57: a key past ACTIVE may still verify (process) what was made
                // under it during its grace, but never protects anything new. The answer goes
                // out under the ACTIVE TAK: the sender confirmed it (162, or the 0810 to a
                // pushed 161) before it became ACTIVE, so it holds it.
                return match &keys.active {
                    Some(active) => MacCheck::Valid(Some(active.wrapped.clone())),
                    None => {
                        warn!(%terminal, "request MACed under a TAK in grace, but no TAK is ACTIVE to answer under");
                        MacCheck::Invalid
                    }
                };
            }
        }
        if !lookup.cached {
            return MacCheck::Invalid;
        }
        // Cached keys may miss a TAK another replica activated since they were read: never
        // refuse on them alone.
        lookup = match ctx.keys.read(ctx.store.as_ref(), terminal, tak, now).await {
            Ok(l) => l,
            Err(_) => return MacCheck::Unavailable,
        };
    }
}

/// Identity of a request's content for duplicate detection: SHA-256 over the message without
/// its MAC, with a repeat MTI (0421) counted as its original (0420), so a retransmission is
/// recognised even when it was MACed under a newer key.
pub fn request_digest(ctx: &SwitchContext, raw: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let end = raw.len().saturating_sub(ctx.packager.mac_wire_len());
    let body = raw.get(..end).unwrap_or(raw);
    let mut hasher = Sha256::new();
    match body.get(..4) {
        Some(b"0421") => hasher.update(b"0420"),
        Some(b"0221") => hasher.update(b"0220"),
        Some(mti) => hasher.update(mti),
        None => {}
    }
    hasher.update(body.get(4..).unwrap_or_default());
    hex::encode(hasher.finalize())
}
