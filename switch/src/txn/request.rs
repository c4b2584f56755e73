//! An incoming message becomes one typed request, once (the way mini-redis turns a frame into a
//! `Command`): what it asks for, with the fields its handler needs already read and checked.
//!
//! Parsing has no side effects and needs nothing but the message, so the dispatcher in
//! [`super::handle_frame`] can still check what comes first on the wire (is the connection
//! signed on as the terminal field 41 names: `58`) before a parse failure (`30`, `12`) is
//! answered — the order of answers SPEC §3 documents is unchanged. Checks that the profile
//! makes after authentication (a withdrawal's amount, a key exchange's key type) stay typed
//! values here and are answered where they were.

use super::authorize::{Operation, card_data, parse_processing_code};
use crate::domain::{ResponseCode, TerminalId};
use crate::iso8583::{Message, fields};
use crate::store::RequestIdentity;

/// What a message asks of the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// 0800: network management, authenticated under the sender's K_NM.
    Network(NetworkAction),
    /// 0810: a terminal's answer to a key the switch pushed.
    PushAnswer,
    /// 0200: balance inquiry or cash withdrawal.
    Financial(Result<Financial, Refused>),
    /// 0220/0221: an acquirer station's advice of a withdrawal it stood in for.
    Advice(Result<AdviceBooking, Refused>),
    /// 0400, 0420, 0421: a reversal of an earlier request.
    Reversal(Result<Reversal, Refused>),
    /// Any other MTI: `12`.
    Unsupported,
}

/// Why a request cannot be processed, decided from the message alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The answer's field 39 (`30` format error, `12` invalid transaction).
    pub code: ResponseCode,
    /// Latency label of the answer.
    pub kind: &'static str,
}

/// Field 70 of an 0800.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkAction {
    /// `001`.
    SignOn,
    /// `002`.
    SignOff,
    /// `301`.
    Echo,
    /// `161`: deliver a working key.
    KeyRequest,
    /// `162`: the terminal confirms the key it received.
    KeyConfirm,
    /// Anything else (or absent): `12` once authenticated.
    Other,
}

/// What identifies a request within its terminal: STAN (11) and transmission date-time (7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Field 11.
    pub stan: String,
    /// Field 7.
    pub transmission: String,
}

impl Trace {
    fn of(message: &Message) -> Option<Self> {
        Some(Self {
            stan: message.get_str(fields::STAN)?.to_string(),
            transmission: message.get_str(fields::TRANSMISSION_DATE_TIME)?.to_string(),
        })
    }

    /// The request's identity when it comes from `terminal` (SPEC §3).
    pub fn identity(&self, terminal: &TerminalId) -> RequestIdentity {
        RequestIdentity {
            terminal_id: terminal.clone(),
            stan: self.stan.clone(),
            transmission: self.transmission.clone(),
        }
    }
}

/// An 0200, read.
#[derive(Clone, PartialEq, Eq)]
pub struct Financial {
    /// Balance inquiry or withdrawal.
    pub operation: Operation,
    /// Processing code positions 3–4 (`00`, `10`, `20`).
    pub account_type: String,
    /// Its identity within the terminal.
    pub trace: Trace,
    /// From field 2, or track 2.
    pub pan: String,
    /// `YYMM`, from field 14 or track 2.
    pub expiry: String,
    /// Field 4 of a withdrawal: `None` when absent or not a number (answered `30` after the MAC
    /// and duplicate checks, as the profile orders it); always `Some(0)` for a balance inquiry.
    pub amount: Option<i64>,
}

impl std::fmt::Debug for Financial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the PAN or expiry
        f.debug_struct("Financial")
            .field("operation", &self.operation)
            .field("account_type", &self.account_type)
            .field("trace", &self.trace)
            .field("amount", &self.amount)
            .finish_non_exhaustive()
    }
}

impl Financial {
    /// Latency label of its answers.
    pub fn kind(&self) -> &'static str {
        match self.operation {
            Operation::Balance => "balance",
            Operation::Withdrawal => "withdrawal",
        }
    }
}

/// An 0220/0221, read.
#[derive(Clone, PartialEq, Eq)]
pub struct AdviceBooking {
    /// Its identity within the station.
    pub trace: Trace,
    /// The card the acquirer paid out on.
    pub pan: String,
    /// Field 4.
    pub amount: i64,
}

impl std::fmt::Debug for AdviceBooking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdviceBooking")
            .field("trace", &self.trace)
            .field("amount", &self.amount)
            .finish_non_exhaustive()
    }
}

/// An 0400/0420/0421, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reversal {
    /// The reversal's own identity.
    pub trace: Trace,
    /// The original's identity, from field 90 (MTI 4, STAN 6, transmission date-time 10, then
    /// acquiring and forwarding institution ids we do not need to find it).
    pub original: Trace,
}

impl Request {
    /// Reads `message` once.
    pub fn from_message(message: &Message) -> Self {
        match message.mti().as_str() {
            "0800" => Request::Network(match message.get_str(fields::NETWORK_CODE) {
                Some("001") => NetworkAction::SignOn,
                Some("002") => NetworkAction::SignOff,
                Some("301") => NetworkAction::Echo,
                Some("161") => NetworkAction::KeyRequest,
                Some("162") => NetworkAction::KeyConfirm,
                _ => NetworkAction::Other,
            }),
            "0810" => Request::PushAnswer,
            "0200" => Request::Financial(financial(message)),
            "0220" | "0221" => Request::Advice(advice(message)),
            "0400" | "0420" | "0421" => Request::Reversal(reversal(message)),
            _ => Request::Unsupported,
        }
    }
}

fn financial(message: &Message) -> Result<Financial, Refused> {
    let refused = |code, kind| Refused { code, kind };
    let Some((operation, account_type)) = message
        .get_str(fields::PROCESSING_CODE)
        .and_then(parse_processing_code)
    else {
        let code = if message.has(fields::PROCESSING_CODE) {
            ResponseCode::InvalidTransaction
        } else {
            ResponseCode::FormatError
        };
        return Err(refused(code, "financial"));
    };
    let kind = match operation {
        Operation::Balance => "balance",
        Operation::Withdrawal => "withdrawal",
    };
    let (Some(trace), Some((pan, expiry))) = (Trace::of(message), card_data(message)) else {
        return Err(refused(ResponseCode::FormatError, kind));
    };
    let amount = match operation {
        Operation::Balance => Some(0),
        Operation::Withdrawal => message
            .get_str(fields::AMOUNT)
            .and_then(|a| a.parse::<i64>().ok()),
    };
    Ok(Financial {
        operation,
        account_type: account_type.to_string(),
        trace,
        pan,
        expiry,
        amount,
    })
}

fn advice(message: &Message) -> Result<AdviceBooking, Refused> {
    let refused = |code| Refused {
        code,
        kind: "advice",
    };
    match message
        .get_str(fields::PROCESSING_CODE)
        .map(parse_processing_code)
    {
        None => return Err(refused(ResponseCode::FormatError)),
        Some(Some((Operation::Withdrawal, _))) => {}
        // stand-in approves withdrawals only; nothing else is ever advised
        Some(_) => return Err(refused(ResponseCode::InvalidTransaction)),
    }
    let amount = message
        .get_str(fields::AMOUNT)
        .and_then(|a| a.parse::<i64>().ok());
    match (Trace::of(message), card_data(message), amount) {
        (Some(trace), Some((pan, _expiry)), Some(amount)) => {
            Ok(AdviceBooking { trace, pan, amount })
        }
        _ => Err(refused(ResponseCode::FormatError)),
    }
}

fn reversal(message: &Message) -> Result<Reversal, Refused> {
    let original = message
        .get_str(fields::ORIGINAL_DATA)
        .and_then(original_trace);
    match (Trace::of(message), original) {
        (Some(trace), Some(original)) => Ok(Reversal { trace, original }),
        _ => Err(Refused {
            code: ResponseCode::FormatError,
            kind: "reversal",
        }),
    }
}

/// The original's STAN and transmission date-time from field 90.
fn original_trace(field90: &str) -> Option<Trace> {
    if field90.len() < 20 || !field90.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Trace {
        stan: field90[4..10].to_string(),
        transmission: field90[10..20].to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::Mti;

    fn message(mti: &str, set: &[(u8, &str)]) -> Message {
        let mut m = Message::new(Mti::parse(mti).unwrap());
        for (field, value) in set {
            m.set_str(*field, value);
        }
        m
    }

    const TRACE: [(u8, &str); 2] = [
        (fields::STAN, "000123"),
        (fields::TRANSMISSION_DATE_TIME, "1122153045"),
    ];

    #[test]
    fn a_withdrawal_is_read_once_with_card_from_track_2() {
        let mut set = TRACE.to_vec();
        set.extend([
            (fields::PROCESSING_CODE, "012000"),
            (fields::AMOUNT, "000000010000"),
            (fields::TRACK2, "6011000000000004=2812101"),
        ]);
        let Request::Financial(Ok(fin)) = Request::from_message(&message("0200", &set)) else {
            panic!("not a financial request");
        };
        assert_eq!(fin.operation, Operation::Withdrawal);
        assert_eq!(fin.account_type, "20");
        assert_eq!(
            (fin.pan.as_str(), fin.expiry.as_str()),
            ("6011000000000004", "2812")
        );
        assert_eq!(fin.amount, Some(10_000));
        assert_eq!(fin.kind(), "withdrawal");
        assert!(
            !format!("{fin:?}").contains("6011"),
            "Debug never shows the PAN"
        );
    }

    #[test]
    fn financial_refusals_follow_the_profile() {
        let refused = |set: &[(u8, &str)]| match Request::from_message(&message("0200", set)) {
            Request::Financial(Err(r)) => Some((r.code, r.kind)),
            _ => None,
        };
        assert_eq!(refused(&[]), Some((ResponseCode::FormatError, "financial")));
        assert_eq!(
            refused(&[(fields::PROCESSING_CODE, "400000")]),
            Some((ResponseCode::InvalidTransaction, "financial"))
        );
        assert_eq!(
            refused(&[(fields::PROCESSING_CODE, "310000")]),
            Some((ResponseCode::FormatError, "balance"))
        );
        // an unreadable amount is a typed value, answered after the MAC check
        let mut set = TRACE.to_vec();
        set.extend([
            (fields::PROCESSING_CODE, "010000"),
            (fields::AMOUNT, "12x"),
            (fields::PAN, "6011000000000004"),
            (fields::EXPIRY, "2812"),
        ]);
        assert!(matches!(
            Request::from_message(&message("0200", &set)),
            Request::Financial(Ok(Financial { amount: None, .. }))
        ));
    }

    #[test]
    fn advices_are_withdrawals_with_an_amount() {
        let mut set = TRACE.to_vec();
        set.extend([
            (fields::PROCESSING_CODE, "010000"),
            (fields::AMOUNT, "000000005000"),
            (fields::PAN, "6011000000000004"),
            (fields::EXPIRY, "2812"),
        ]);
        assert!(matches!(
            Request::from_message(&message("0221", &set)),
            Request::Advice(Ok(AdviceBooking { amount: 5000, .. }))
        ));
        set[2] = (fields::PROCESSING_CODE, "310000");
        assert!(matches!(
            Request::from_message(&message("0220", &set)),
            Request::Advice(Err(Refused {
                code: ResponseCode::InvalidTransaction,
                ..
            }))
        ));
    }

    #[test]
    fn field_90_names_the_original() {
        let f90 = "020000012311221530450000000000000000000000";
        let t = original_trace(f90).unwrap();
        assert_eq!(
            (t.stan.as_str(), t.transmission.as_str()),
            ("000123", "1122153045")
        );
        assert!(original_trace("0200").is_none());
        assert!(original_trace("02000001231122153045XXXXXXXXXXX").is_none());
        let mut set = TRACE.to_vec();
        set.push((fields::ORIGINAL_DATA, f90));
        assert!(matches!(
            Request::from_message(&message("0420", &set)),
            Request::Reversal(Ok(_))
        ));
    }

    #[test]
    fn network_codes_and_other_mtis() {
        let code = |c| Request::from_message(&message("0800", &[(fields::NETWORK_CODE, c)]));
        assert_eq!(code("001"), Request::Network(NetworkAction::SignOn));
        assert_eq!(code("162"), Request::Network(NetworkAction::KeyConfirm));
        assert_eq!(code("999"), Request::Network(NetworkAction::Other));
        assert_eq!(
            Request::from_message(&message("0810", &[])),
            Request::PushAnswer
        );
        assert_eq!(
            Request::from_message(&message("0100", &[])),
            Request::Unsupported
        );
    }
}
