//! The ATM side of the Switchyard profile: a terminal that signs on, exchanges keys, MACs its
//! messages, enciphers PIN blocks and answers server-initiated key changes. Used by the
//! `switchyard-atm` simulator and load generator, the demo, and the integration tests.

pub mod load;
pub mod provision;
pub mod session;
pub mod web;

use std::time::Duration;

use bytes::BytesMut;
use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::{NetStream, TlsClient};

use crate::crypto::{ClearPin, KeyCheckValue, TerminalKeys};
use crate::domain::{KeyType, TerminalId};
use crate::iso8583::fields;
use crate::iso8583::{Message, Mti, Packager};
use crate::iso8583::{decode_frame, encode_frame};

/// Failures of the terminal side.
#[derive(Debug, thiserror::Error)]
pub enum AtmError {
    /// Socket.
    #[error("failed to talk to the switch: {0}")]
    Io(#[from] std::io::Error),
    /// The switch closed the connection.
    #[error("the switch closed the connection")]
    Closed,
    /// No answer in time.
    #[error("no answer from the switch within {0:?}")]
    Timeout(Duration),
    /// Bytes that are not a valid message.
    #[error("failed to parse the switch's answer: {0}")]
    Codec(String),
    /// An answer we did not expect.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A key or MAC problem on the terminal side.
    #[error("terminal cryptography failed: {0}")]
    Crypto(String),
}

/// A simulated terminal connected to a switch.
#[derive(Debug)]
pub struct AtmClient {
    /// Terminal id.
    pub id: TerminalId,
    /// The terminal's clear keys.
    pub keys: TerminalKeys,
    packager: &'static Packager,
    stream: NetStream,
    buffer: BytesMut,
    stan: u32,
    timeout: Duration,
    /// Server-initiated key changes answered while waiting for other answers.
    pub key_changes: Vec<KeyType>,
    /// Exchanges kept for display when [`AtmClient::record_exchanges`] turned recording on.
    journal: Option<Vec<Exchange>>,
}

/// Who started an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The terminal sent the request.
    Terminal,
    /// The switch sent the request (a pushed key change).
    Switch,
}

/// One request and its answer as the terminal saw them, for the web ATM's ISO 8583 panel.
/// Holds clear field values (PAN, PIN block): render it only through a masking view.
#[derive(Clone)]
pub struct Exchange {
    /// Who sent `request`.
    pub initiator: Initiator,
    /// The request as sent (MAC included).
    pub request: Message,
    /// The answer, or `None` when none came.
    pub answer: Option<Message>,
    /// Send to answer.
    pub elapsed: Duration,
    /// When the request was sent.
    pub at: chrono::DateTime<Utc>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Message's Debug masks the PAN; the PIN block is left out here altogether.
        f.debug_struct("Exchange")
            .field("initiator", &self.initiator)
            .field("request", &self.request.mti().as_str())
            .field(
                "answer",
                &self
                    .answer
                    .as_ref()
                    .map(|a| a.get_str(39).map(str::to_string)),
            )
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

impl AtmClient {
    /// Connects to the switch's ISO 8583 port.
    pub async fn connect(
        addr: &str,
        id: TerminalId,
        keys: TerminalKeys,
        packager: &'static Packager,
    ) -> Result<Self, AtmError> {
        Self::connect_with(addr, None, id, keys, packager).await
    }

    /// Connects to the switch's ISO 8583 port, over TLS when `tls` is given (`[iso8583.tls]`).
    pub async fn connect_with(
        addr: &str,
        tls: Option<&TlsClient>,
        id: TerminalId,
        keys: TerminalKeys,
        packager: &'static Packager,
    ) -> Result<Self, AtmError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            Some(tls) => tls.connect(addr, tcp).await?,
            None => NetStream::Plain(tcp),
        };
        Ok(Self {
            id,
            keys,
            packager,
            stream,
            buffer: BytesMut::with_capacity(1024),
            stan: rand::random::<u32>() % 900_000,
            timeout: Duration::from_secs(10),
            key_changes: Vec::new(),
            journal: None,
        })
    }

    /// Starts keeping every request/answer pair (and answered key pushes) for
    /// [`AtmClient::take_exchanges`]. Off by default: the load generator keeps nothing.
    pub fn record_exchanges(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// The exchanges recorded since the last call.
    pub fn take_exchanges(&mut self) -> Vec<Exchange> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn record(&mut self, exchange: Exchange) {
        if let Some(journal) = self.journal.as_mut() {
            journal.push(exchange);
        }
    }

    /// The next STAN (field 11).
    pub fn next_stan(&mut self) -> String {
        self.stan = (self.stan + 1) % 1_000_000;
        format!("{:06}", self.stan)
    }

    /// A request skeleton: MTI, 7, 11, 12, 13, 41.
    pub fn new_request(&mut self, mti: &str) -> Result<Message, AtmError> {
        let mti = Mti::parse(mti).map_err(|e| AtmError::Codec(e.to_string()))?;
        let now = Utc::now();
        let mut m = Message::new(mti);
        m.set_str(
            fields::TRANSMISSION_DATE_TIME,
            &now.format("%m%d%H%M%S").to_string(),
        );
        let stan = self.next_stan();
        m.set_str(fields::STAN, &stan);
        m.set_str(fields::TERMINAL_ID, &self.id.to_field41());
        Ok(m)
    }

    /// Sends `bytes` as one frame, as they are (tests use it to send what a real terminal would
    /// not).
    pub async fn send_frame(&mut self, bytes: &[u8]) -> Result<(), AtmError> {
        self.send(bytes).await
    }

    /// Reads the next message from the switch, whatever it is, with its raw bytes.
    pub async fn read_message(&mut self) -> Result<(Message, Vec<u8>), AtmError> {
        let deadline = self.timeout;
        let raw = tokio::time::timeout(deadline, self.read_frame())
            .await
            .map_err(|_| AtmError::Timeout(deadline))??;
        let m = self
            .packager
            .unpack(&raw)
            .map_err(|e| AtmError::Codec(e.to_string()))?;
        Ok((m, raw))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), AtmError> {
        let mut out = BytesMut::with_capacity(bytes.len() + 2);
        encode_frame(bytes, &mut out).map_err(|e| AtmError::Codec(e.to_string()))?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, AtmError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buffer, 65_535)
                .map_err(|e| AtmError::Codec(e.to_string()))?
            {
                return Ok(frame.to_vec());
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(AtmError::Closed);
            }
        }
    }

    /// Packs `message`, MACing it when `mac` is set: network management (08xx) under K_NM,
    /// derived from the TMK (profile v2), everything else under the TAK.
    pub fn pack(&self, message: &mut Message, mac: bool) -> Result<Vec<u8>, AtmError> {
        if mac {
            let field = crate::iso8583::mac_field_for(message);
            message.set(field, vec![0u8; 8]);
            let input = self
                .packager
                .pack_mac_input(message)
                .map_err(|e| AtmError::Codec(e.to_string()))?;
            let code = if is_network_management(message) {
                self.keys.nm_mac(&self.id.to_field41(), &input)
            } else {
                self.keys
                    .mac(&input)
                    .map_err(|e| AtmError::Crypto(e.to_string()))?
            };
            message.set(field, code);
        }
        self.packager
            .pack(message)
            .map_err(|e| AtmError::Codec(e.to_string()))
    }

    /// Sends raw bytes as one frame and waits for the answer to STAN `stan`.
    pub async fn exchange_raw(
        &mut self,
        bytes: &[u8],
        stan: &str,
    ) -> Result<(Message, Vec<u8>), AtmError> {
        self.send(bytes).await?;
        let deadline = self.timeout;
        tokio::time::timeout(deadline, self.await_answer(stan))
            .await
            .map_err(|_| AtmError::Timeout(deadline))?
    }

    /// Sends `message` (MACed if `mac`) and returns the answer with its raw bytes. The answer to
    /// a MACed request is checked like an ATM checks it: a MAC that does not verify under the
    /// terminal's TAK (or the one its last key change replaced) is an error; an answer without
    /// a MAC (the switch's `63`, `58`, `30` to what it could not authenticate) is returned as is.
    pub async fn request(
        &mut self,
        mut message: Message,
        mac: bool,
    ) -> Result<(Message, Vec<u8>), AtmError> {
        let stan = message
            .get_str(fields::STAN)
            .unwrap_or_default()
            .to_string();
        let bytes = self.pack(&mut message, mac)?;
        let at = Utc::now();
        let started = std::time::Instant::now();
        let result = self.exchange_raw(&bytes, &stan).await;
        if self.journal.is_some() {
            self.record(Exchange {
                initiator: Initiator::Terminal,
                request: message,
                answer: result.as_ref().ok().map(|(a, _)| a.clone()),
                elapsed: started.elapsed(),
                at,
            });
        }
        let (answer, raw) = result?;
        if mac {
            self.check_answer_mac(&answer, &raw)?;
        }
        Ok((answer, raw))
    }

    /// Sends `messages` MACed, back to back without waiting (as an acquirer station's process
    /// pipelines requests on one connection), then collects one answer per STAN, in the order
    /// they arrive. Answers are checked like [`AtmClient::request`] checks them.
    pub async fn pipeline(&mut self, messages: Vec<Message>) -> Result<Vec<Message>, AtmError> {
        let mut waiting = std::collections::HashSet::new();
        let mut out = BytesMut::new();
        for mut m in messages {
            waiting.insert(m.get_str(fields::STAN).unwrap_or_default().to_string());
            let bytes = self.pack(&mut m, true)?;
            encode_frame(&bytes, &mut out).map_err(|e| AtmError::Codec(e.to_string()))?;
        }
        self.stream.write_all(&out).await?;
        let deadline = self.timeout;
        let mut answers = Vec::with_capacity(waiting.len());
        tokio::time::timeout(deadline, async {
            while !waiting.is_empty() {
                let raw = self.read_frame().await?;
                let m = self
                    .packager
                    .unpack(&raw)
                    .map_err(|e| AtmError::Codec(e.to_string()))?;
                if m.mti().as_str() == "0800" && m.get_str(fields::NETWORK_CODE) == Some("161") {
                    self.answer_key_push(&m, &raw).await?;
                    continue;
                }
                if !waiting.remove(m.get_str(fields::STAN).unwrap_or_default()) {
                    return Err(AtmError::Protocol(format!(
                        "answer {} with STAN {:?} nobody waits for",
                        m.mti().as_str(),
                        m.get_str(fields::STAN)
                    )));
                }
                self.check_answer_mac(&m, &raw)?;
                answers.push(m);
            }
            Ok(())
        })
        .await
        .map_err(|_| AtmError::Timeout(deadline))??;
        Ok(answers)
    }

    /// The MAC field is the last one, so the MAC input is the received bytes before it. A
    /// network-management answer (0810) must verify under K_NM, any other under the TAK.
    fn check_answer_mac(&self, answer: &Message, raw: &[u8]) -> Result<(), AtmError> {
        if !answer.has(fields::MAC) && !answer.has(fields::MAC_SECONDARY) {
            return Ok(());
        }
        if is_network_management(answer) {
            return if self.nm_mac_verifies(answer, raw) {
                Ok(())
            } else {
                Err(AtmError::Crypto(
                    "the switch's 0810 does not verify under K_NM: not talking to the real switch?"
                        .into(),
                ))
            };
        }
        let (input, mac) = self
            .packager
            .received_mac(raw, answer)
            .map_err(|e| AtmError::Crypto(format!("answer MAC: {e}")))?;
        match self.keys.verify_answer_mac(input, mac) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AtmError::Crypto(format!(
                "the MAC of answer {} (STAN {:?}) does not verify under the terminal's TAK",
                answer.mti().as_str(),
                answer.get_str(fields::STAN)
            ))),
            Err(e) => Err(AtmError::Crypto(e.to_string())),
        }
    }

    async fn await_answer(&mut self, stan: &str) -> Result<(Message, Vec<u8>), AtmError> {
        loop {
            let raw = self.read_frame().await?;
            let m = self
                .packager
                .unpack(&raw)
                .map_err(|e| AtmError::Codec(e.to_string()))?;
            if m.mti().as_str() == "0800" && m.get_str(fields::NETWORK_CODE) == Some("161") {
                self.answer_key_push(&m, &raw).await?;
                continue;
            }
            if m.get_str(fields::STAN) == Some(stan) {
                return Ok((m, raw));
            }
            return Err(AtmError::Protocol(format!(
                "answer {} with STAN {:?} while waiting for {stan}",
                m.mti().as_str(),
                m.get_str(fields::STAN)
            )));
        }
    }

    /// Whether a network-management message from the switch carries a MAC that verifies under
    /// this terminal's K_NM (profile v2). A terminal trusts no 0800/0810 without one.
    pub fn nm_mac_verifies(&self, message: &Message, raw: &[u8]) -> bool {
        let Ok((input, mac)) = self.packager.received_mac(raw, message) else {
            return false;
        };
        self.keys.verify_nm_mac(&self.id.to_field41(), input, mac)
    }

    /// Takes a server-initiated key change: check its MAC under K_NM, unwrap under the TMK,
    /// check the KCV, answer 0810 (MACed under K_NM). A push that does not verify is declined
    /// with `63` and its key is not installed.
    pub async fn answer_key_push(&mut self, push: &Message, raw: &[u8]) -> Result<(), AtmError> {
        let kt = push
            .get_str(fields::KEY_TYPE)
            .and_then(|s| s.parse::<KeyType>().ok())
            .ok_or_else(|| AtmError::Protocol("key push without a key type in 48".into()))?;
        let block = push
            .get_str(fields::KEY_BLOCK)
            .unwrap_or_default()
            .to_string();
        let kcv = push.get_str(fields::KCV).unwrap_or_default().to_string();
        let mut answer = Message::new(
            push.mti()
                .response()
                .ok_or_else(|| AtmError::Protocol("0800 has no response MTI".into()))?,
        );
        for f in [
            fields::TRANSMISSION_DATE_TIME,
            fields::STAN,
            fields::TERMINAL_ID,
            fields::KEY_TYPE,
            fields::NETWORK_CODE,
        ] {
            if let Some(v) = push.get(f) {
                answer.set(f, v);
            }
        }
        let accepted = if self.nm_mac_verifies(push, raw) {
            kcv.parse::<KeyCheckValue>()
                .map_err(|e| e.to_string())
                .and_then(|kcv| {
                    self.keys
                        .accept_key_block(kt, &block, &kcv)
                        .map_err(|e| e.to_string())
                })
        } else {
            Err("the push's MAC does not verify under K_NM".to_string())
        };
        match accepted {
            Ok(computed) => {
                answer.set_str(fields::RESPONSE_CODE, "00");
                answer.set_str(fields::KCV, &computed.to_string());
                self.key_changes.push(kt);
            }
            Err(_) => answer.set_str(fields::RESPONSE_CODE, "63"),
        }
        let bytes = self.pack(&mut answer, true)?;
        self.send(&bytes).await?;
        if self.journal.is_some() {
            self.record(Exchange {
                initiator: Initiator::Switch,
                request: push.clone(),
                answer: Some(answer),
                elapsed: Duration::ZERO,
                at: Utc::now(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for a server-initiated key change and answers it.
    pub async fn wait_for_key_push(&mut self, timeout: Duration) -> Result<KeyType, AtmError> {
        let before = self.key_changes.len();
        let result = tokio::time::timeout(timeout, async {
            loop {
                let raw = self.read_frame().await?;
                let m = self
                    .packager
                    .unpack(&raw)
                    .map_err(|e| AtmError::Codec(e.to_string()))?;
                if m.mti().as_str() == "0800" && m.get_str(fields::NETWORK_CODE) == Some("161") {
                    self.answer_key_push(&m, &raw).await?;
                    return Ok::<(), AtmError>(());
                }
            }
        })
        .await;
        match result {
            Ok(Ok(())) => self
                .key_changes
                .get(before)
                .copied()
                .ok_or_else(|| AtmError::Protocol("key push not recorded".into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AtmError::Timeout(timeout)),
        }
    }

    /// 0800 with network management code `code` (001 sign-on, 002 sign-off, 301 echo), MACed
    /// under K_NM. The answer must verify under K_NM too, unless it is a refusal the switch
    /// could not authenticate us for (`63`, `58`, `30` come without a MAC).
    pub async fn network(&mut self, code: &str) -> Result<Message, AtmError> {
        let mut m = self.new_request("0800")?;
        m.set_str(fields::NETWORK_CODE, code);
        self.network_request(m).await
    }

    /// Sends a network-management request MACed under K_NM. The answer's MAC is checked by
    /// [`AtmClient::request`]; an answer without one must be a refusal the switch could not
    /// authenticate us for.
    async fn network_request(&mut self, message: Message) -> Result<Message, AtmError> {
        let (answer, _) = self.request(message, true).await?;
        let unmacd = !answer.has(fields::MAC) && !answer.has(fields::MAC_SECONDARY);
        if unmacd
            && !matches!(
                answer.get_str(fields::RESPONSE_CODE),
                Some("63" | "58" | "30")
            )
        {
            return Err(AtmError::Crypto(
                "the switch's 0810 carries no MAC: not talking to the real switch?".into(),
            ));
        }
        Ok(answer)
    }

    /// Terminal-initiated key exchange: 161, unwrap, 162 with the KCV. Returns the KCV.
    pub async fn exchange_key(&mut self, kt: KeyType) -> Result<String, AtmError> {
        let mut m = self.new_request("0800")?;
        m.set_str(fields::NETWORK_CODE, "161");
        m.set_str(fields::KEY_TYPE, kt.as_str());
        let answer = self.network_request(m).await?;
        expect_code(&answer, "00")?;
        let block = answer
            .get_str(fields::KEY_BLOCK)
            .unwrap_or_default()
            .to_string();
        let kcv = answer.get_str(fields::KCV).unwrap_or_default().to_string();
        let kcv = kcv
            .parse::<KeyCheckValue>()
            .map_err(|e| AtmError::Protocol(format!("field 122: {e}")))?;
        let computed = self
            .keys
            .accept_key_block(kt, &block, &kcv)
            .map_err(|e| AtmError::Crypto(e.to_string()))?
            .to_string();
        let mut confirm = self.new_request("0800")?;
        confirm.set_str(fields::NETWORK_CODE, "162");
        confirm.set_str(fields::KEY_TYPE, kt.as_str());
        confirm.set_str(fields::KCV, &computed);
        let answer = self.network_request(confirm).await?;
        expect_code(&answer, "00")?;
        Ok(computed)
    }

    /// A financial 0200 for `processing_code` with card data, PIN block and MAC.
    pub fn financial(
        &mut self,
        processing_code: &str,
        card: &CardInput,
        amount: i64,
    ) -> Result<Message, AtmError> {
        let mut m = self.new_request("0200")?;
        let now = Utc::now();
        m.set_str(fields::PAN, &card.pan);
        m.set_str(fields::PROCESSING_CODE, processing_code);
        m.set_str(fields::AMOUNT, &format!("{amount:012}"));
        m.set_str(fields::LOCAL_TIME, &now.format("%H%M%S").to_string());
        m.set_str(fields::LOCAL_DATE, &now.format("%m%d").to_string());
        m.set_str(fields::EXPIRY, &card.expiry);
        m.set_str(fields::POS_ENTRY_MODE, "051");
        m.set_str(fields::CARD_ACCEPTOR_ID, "SWITCHYARD-ATM ");
        m.set_str(fields::CURRENCY, &card.currency);
        let pin = ClearPin::new(&card.pin).map_err(|e| AtmError::Crypto(e.to_string()))?;
        let block = self
            .keys
            .encipher_pin(&card.pan, &pin)
            .map_err(|e| AtmError::Crypto(e.to_string()))?;
        m.set_str(fields::PIN_BLOCK, &hex::encode_upper(block));
        Ok(m)
    }

    /// Balance inquiry.
    pub async fn balance(&mut self, card: &CardInput) -> Result<Message, AtmError> {
        let m = self.financial("310000", card, 0)?;
        Ok(self.request(m, true).await?.0)
    }

    /// Cash withdrawal; returns the request too (a reversal names it).
    pub async fn withdraw(
        &mut self,
        card: &CardInput,
        amount: i64,
    ) -> Result<(Message, Message), AtmError> {
        let m = self.financial("010000", card, amount)?;
        let (answer, _) = self.request(m.clone(), true).await?;
        Ok((m, answer))
    }

    /// Reversal (0400) of `original`.
    pub async fn reverse(&mut self, original: &Message) -> Result<Message, AtmError> {
        let mut m = self.new_request("0400")?;
        for f in [
            fields::PAN,
            fields::PROCESSING_CODE,
            fields::AMOUNT,
            fields::LOCAL_TIME,
            fields::LOCAL_DATE,
            fields::EXPIRY,
            fields::POS_ENTRY_MODE,
            fields::CARD_ACCEPTOR_ID,
            fields::CURRENCY,
        ] {
            if let Some(v) = original.get(f) {
                m.set(f, v);
            }
        }
        m.set_str(fields::ORIGINAL_DATA, &original_data_elements(original));
        Ok(self.request(m, true).await?.0)
    }
}

/// Whether `message` is network management (0800/0810), MACed under K_NM in profile v2.
fn is_network_management(message: &Message) -> bool {
    message.mti().as_str().starts_with("08")
}

/// Field 90 naming `original`: MTI, STAN, transmission date-time, zero institution ids.
pub fn original_data_elements(original: &Message) -> String {
    format!(
        "{}{}{}{}",
        original.mti().as_str(),
        original.get_str(fields::STAN).unwrap_or("000000"),
        original
            .get_str(fields::TRANSMISSION_DATE_TIME)
            .unwrap_or("0000000000"),
        "0".repeat(22)
    )
}

/// A card as the simulator uses it (clear PAN and PIN: this is the terminal side).
#[derive(Clone)]
pub struct CardInput {
    /// PAN.
    pub pan: String,
    /// `YYMM`.
    pub expiry: String,
    /// PIN.
    pub pin: String,
    /// ISO 4217 numeric.
    pub currency: String,
}

impl std::fmt::Debug for CardInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardInput")
            .field("pan", &"<redacted>")
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// Fails unless field 39 is `code`.
pub fn expect_code(m: &Message, code: &str) -> Result<(), AtmError> {
    match m.get_str(fields::RESPONSE_CODE) {
        Some(c) if c == code => Ok(()),
        other => Err(AtmError::Protocol(format!(
            "{} answered {other:?}, expected {code}",
            m.mti().as_str()
        ))),
    }
}
