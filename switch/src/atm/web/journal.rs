//! The ISO 8583 panel's view of an exchange: MTI, named fields, response code and timing, with
//! the PAN masked and the PIN block, MAC and key block withheld. Pure, so what the page may
//! show is decided (and tested) here, not in the browser.

use serde::Serialize;

use super::machine::mask_pan;
use crate::atm::{Exchange, Initiator};
use crate::iso8583::Message;

/// One field as the panel shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FieldView {
    /// Field number.
    pub n: u8,
    /// What the field is.
    pub name: &'static str,
    /// The value, masked or withheld where the field is sensitive.
    pub value: String,
}

/// One message.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    /// MTI.
    pub mti: String,
    /// Fields in order.
    pub fields: Vec<FieldView>,
}

/// One exchange.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeView {
    /// Sequence number since start.
    pub seq: u64,
    /// `HH:MM:SS.mmm` UTC.
    pub at: String,
    /// `ATM → switch` or `switch → ATM`.
    pub direction: &'static str,
    /// What it was, e.g. "balance inquiry".
    pub summary: String,
    /// Field 39 of the answer.
    pub response_code: Option<String>,
    /// What field 39 means.
    pub response_text: Option<&'static str>,
    /// Round trip in milliseconds (terminal-initiated exchanges).
    pub elapsed_ms: Option<f64>,
    /// The request.
    pub request: MessageView,
    /// The answer, if one came.
    pub answer: Option<MessageView>,
}

/// Builds the view of `exchange`.
pub fn view(seq: u64, exchange: &Exchange) -> ExchangeView {
    let code = exchange
        .answer
        .as_ref()
        .and_then(|a| a.get_str(39))
        .map(str::to_string);
    ExchangeView {
        seq,
        at: exchange.at.format("%H:%M:%S%.3f").to_string(),
        direction: match exchange.initiator {
            Initiator::Terminal => "ATM → switch",
            Initiator::Switch => "switch → ATM",
        },
        summary: summary(&exchange.request),
        response_text: code.as_deref().map(response_text),
        response_code: code,
        elapsed_ms: (exchange.initiator == Initiator::Terminal)
            .then(|| (exchange.elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0),
        request: message_view(&exchange.request),
        answer: exchange.answer.as_ref().map(message_view),
    }
}

fn message_view(m: &Message) -> MessageView {
    MessageView {
        mti: m.mti().as_str().to_string(),
        fields: m
            .fields()
            .map(|(n, v)| FieldView {
                n,
                name: field_name(n),
                value: field_value(n, v),
            })
            .collect(),
    }
}

/// What a request is, in words.
pub fn summary(m: &Message) -> String {
    let mti = m.mti();
    let what = match (mti.as_str(), m.get_str(70), m.get_str(3)) {
        ("0800", Some("001"), _) => "sign-on".to_string(),
        ("0800", Some("002"), _) => "sign-off".to_string(),
        ("0800", Some("301"), _) => "echo".to_string(),
        ("0800", Some("161"), _) => {
            format!("{} key change", m.get_str(48).unwrap_or("?"))
        }
        ("0800", Some("162"), _) => {
            format!("{} key change confirmation", m.get_str(48).unwrap_or("?"))
        }
        ("0200", _, Some(p)) if p.starts_with("31") => "balance inquiry".to_string(),
        ("0200", _, Some(p)) if p.starts_with("01") => "cash withdrawal".to_string(),
        ("0400", _, _) => "reversal".to_string(),
        _ => "message".to_string(),
    };
    format!("{} {what}", mti.as_str())
}

fn field_name(n: u8) -> &'static str {
    match n {
        2 => "PAN",
        3 => "processing code",
        4 => "amount",
        7 => "transmission date-time",
        11 => "STAN",
        12 => "local time",
        13 => "local date",
        14 => "expiry",
        22 => "entry mode",
        35 => "track 2",
        37 => "RRN",
        38 => "auth code",
        39 => "response code",
        41 => "terminal id",
        42 => "card acceptor id",
        48 => "private data",
        49 => "currency",
        52 | 123 => "PIN block",
        54 => "additional amounts",
        64 | 128 => "MAC",
        70 => "network management code",
        90 => "original data elements",
        120 => "key block",
        122 => "key check value",
        _ => "",
    }
}

fn field_value(n: u8, v: &[u8]) -> String {
    match n {
        2 => mask_pan(&String::from_utf8_lossy(v)),
        35 => {
            // PAN=YYMM…: only the masked PAN is shown.
            let text = String::from_utf8_lossy(v);
            let pan = text.split(['=', 'D']).next().unwrap_or_default();
            format!("{}=…", mask_pan(pan))
        }
        52 | 123 => "(withheld: PIN block)".into(),
        64 | 128 => "(withheld: 8-byte MAC)".into(),
        120 => "(withheld: TR-31 key block)".into(),
        _ if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => {
            String::from_utf8_lossy(v).into_owned()
        }
        _ => hex::encode_upper(v),
    }
}

/// What a response code means (SPEC §3).
pub fn response_text(code: &str) -> &'static str {
    match code {
        "00" => "approved",
        "05" => "do not honour",
        "12" => "invalid transaction",
        "13" => "invalid amount",
        "14" => "invalid card",
        "21" => "no action taken",
        "30" => "format error",
        "51" => "insufficient funds",
        "54" => "expired card",
        "55" => "incorrect PIN",
        "58" => "not permitted to terminal",
        "61" => "exceeds withdrawal limit",
        "62" => "restricted card",
        "63" => "security violation",
        "75" => "PIN tries exceeded",
        "91" => "issuer unavailable",
        "94" => "duplicate",
        "96" => "system malfunction",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::Mti;
    use std::time::Duration;

    #[test]
    fn sensitive_fields_are_masked_or_withheld() {
        let mut req = Message::new(Mti::parse("0200").unwrap());
        req.set_str(2, "6011000000000004");
        req.set_str(3, "010000");
        req.set_str(4, "000000010000");
        req.set_str(35, "6011000000000004=2812");
        req.set_str(123, "0123456789ABCDEF0123456789ABCDEF");
        req.set(64, [0xAB; 8]);
        let mut answer = Message::new(Mti::parse("0210").unwrap());
        answer.set_str(39, "51");
        answer.set_str(120, "D0144P0AE00E0000SECRETKEYBLOCK");
        let x = Exchange {
            initiator: Initiator::Terminal,
            request: req,
            answer: Some(answer),
            elapsed: Duration::from_micros(1234),
            at: chrono::Utc::now(),
        };
        let v = view(1, &x);
        assert_eq!(v.summary, "0200 cash withdrawal");
        assert_eq!(v.response_code.as_deref(), Some("51"));
        assert_eq!(v.response_text, Some("insufficient funds"));
        assert_eq!(v.elapsed_ms, Some(1.2));
        let json = serde_json::to_string(&v).unwrap();
        for secret in [
            "6011000000000004",
            "0123456789ABCDEF",
            "ABABABAB",
            "SECRETKEYBLOCK",
        ] {
            assert!(!json.contains(secret), "{secret} leaked: {json}");
        }
        assert!(json.contains("601100******0004"));
        assert!(json.contains("000000010000"));
    }

    #[test]
    fn network_management_is_named() {
        let mut m = Message::new(Mti::parse("0800").unwrap());
        m.set_str(70, "161");
        m.set_str(48, "TAK");
        assert_eq!(summary(&m), "0800 TAK key change");
        m.set_str(70, "001");
        assert_eq!(summary(&m), "0800 sign-on");
    }
}
