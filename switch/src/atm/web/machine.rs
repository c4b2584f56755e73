//! The web ATM's customer-facing state machine, pure: key presses in, screens and
//! authorization requests out. The page only renders what [`AtmMachine::view`] returns and posts
//! key presses; the I/O shell (`super`) carries out the [`Txn`]s this machine asks for and feeds
//! their [`Outcome`]s back. The PIN typed on the pad lives here (wiped on drop) until the shell
//! turns it into a PIN block; it is never part of a view.

use serde::Serialize;
use zeroize::Zeroizing;

/// A card the card slot offers (test cards provisioned for the web ATM, or given on the command
/// line). The clear PAN stays on the server; views carry a masked one.
#[derive(Clone)]
pub struct TestCard {
    /// PAN.
    pub pan: String,
    /// Expiry `YYMM`.
    pub expiry: String,
    /// ISO 4217 numeric currency of the card's account.
    pub currency: String,
    /// What the card is for, shown on the card (e.g. "Everyday account, PIN 1234").
    pub label: String,
}

impl std::fmt::Debug for TestCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCard")
            .field("pan", &mask_pan(&self.pan))
            .field("label", &self.label)
            .finish()
    }
}

/// First six and last four digits, the PCI DSS display maximum.
pub fn mask_pan(pan: &str) -> String {
    if pan.len() < 13 || !pan.is_ascii() {
        return "*".repeat(pan.len());
    }
    format!(
        "{}{}{}",
        &pan[..6],
        "*".repeat(pan.len() - 10),
        &pan[pan.len() - 4..]
    )
}

/// The eight keys beside the screen, four left (L1 top) and four right (R1 top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideKey {
    /// Left, top to bottom.
    L1,
    /// Left, second.
    L2,
    /// Left, third.
    L3,
    /// Left, bottom.
    L4,
    /// Right, top.
    R1,
    /// Right, second.
    R2,
    /// Right, third.
    R3,
    /// Right, bottom.
    R4,
}

impl SideKey {
    const ALL: [SideKey; 8] = [
        SideKey::L1,
        SideKey::L2,
        SideKey::L3,
        SideKey::L4,
        SideKey::R1,
        SideKey::R2,
        SideKey::R3,
        SideKey::R4,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Something the customer did at the ATM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A digit on the PIN pad.
    Digit(u8),
    /// The yellow key: clear the entry.
    Clear,
    /// The red key.
    Cancel,
    /// The green key.
    Enter,
    /// A key beside the screen.
    Side(SideKey),
    /// A card (by its index in the card list) pushed into the card slot.
    InsertCard(usize),
    /// The card taken from the slot.
    TakeCard,
    /// The notes taken from the cash slot.
    TakeCash,
    /// The receipt taken from the receipt slot.
    TakeReceipt,
}

/// Why a key name from the page was not understood.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown key {0:?}: expected 0-9, clear, cancel, enter, L1-L4, R1-R4, insert:N, take-card, take-cash or take-receipt"
)]
pub struct UnknownKey(String);

impl std::str::FromStr for Key {
    type Err = UnknownKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = match s {
            "clear" => Key::Clear,
            "cancel" => Key::Cancel,
            "enter" => Key::Enter,
            "take-card" => Key::TakeCard,
            "take-cash" => Key::TakeCash,
            "take-receipt" => Key::TakeReceipt,
            "L1" => Key::Side(SideKey::L1),
            "L2" => Key::Side(SideKey::L2),
            "L3" => Key::Side(SideKey::L3),
            "L4" => Key::Side(SideKey::L4),
            "R1" => Key::Side(SideKey::R1),
            "R2" => Key::Side(SideKey::R2),
            "R3" => Key::Side(SideKey::R3),
            "R4" => Key::Side(SideKey::R4),
            d if d.len() == 1 && d.as_bytes()[0].is_ascii_digit() => {
                Key::Digit(d.as_bytes()[0] - b'0')
            }
            other => match other
                .strip_prefix("insert:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => Key::InsertCard(n),
                None => return Err(UnknownKey(s.chars().take(32).collect())),
            },
        };
        Ok(key)
    }
}

/// An authorization the shell must carry out with the card in the slot and the PIN entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Txn {
    /// 0200 balance inquiry.
    Balance,
    /// 0200 cash withdrawal of this many minor units.
    Withdraw(i64),
    /// 0400 reversal of the withdrawal whose cash the customer did not take.
    Reverse(i64),
}

/// What came back for a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 39 = `00`.
    Approved {
        /// Field 38.
        auth_code: Option<String>,
        /// Field 37.
        rrn: Option<String>,
        /// Available balance from field 54, minor units.
        available: Option<i64>,
        /// Ledger balance from field 54, minor units.
        ledger: Option<i64>,
    },
    /// Any other response code.
    Declined(String),
    /// No answer (switch unreachable, timeout, an answer that failed its MAC check).
    NoAnswer,
}

/// Why the card is being handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// The customer is done.
    Goodbye,
    /// The customer pressed Cancel.
    Cancelled,
    /// The cash was retracted and the withdrawal reversed.
    CashRetracted,
    /// The cash was retracted but the reversal was not confirmed.
    ReversalUnconfirmed,
}

/// Which screen the ATM shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// Waiting for a card.
    Welcome,
    /// PIN entry; `then` retries a transaction after a wrong PIN.
    EnterPin {
        /// Transaction to send as soon as the PIN is entered.
        then: Option<Txn>,
        /// A hint shown under the entry (e.g. "PIN must have 4 to 12 digits").
        hint: Option<&'static str>,
    },
    /// Main menu.
    Menu,
    /// Preset amounts.
    FastCash,
    /// Amount entry in whole currency units.
    OtherAmount {
        /// A hint shown under the entry.
        hint: Option<&'static str>,
    },
    /// Waiting for the switch.
    Processing(Txn),
    /// Balance inquiry approved.
    Balance {
        /// Available balance, minor units.
        available: Option<i64>,
        /// Ledger balance, minor units.
        ledger: Option<i64>,
    },
    /// Withdrawal approved, notes presented.
    TakeCash {
        /// Amount, minor units.
        amount: i64,
    },
    /// Notes taken; a receipt?
    ReceiptQuestion,
    /// `55`: wrong PIN, the transaction waits for a new PIN.
    WrongPin(Txn),
    /// `51`.
    InsufficientFunds,
    /// `61`.
    LimitExceeded,
    /// `75`: card retained.
    CardRetained,
    /// `91`/`96`, no answer, or the terminal not in service (`58`, `63`).
    Unavailable,
    /// Any other decline.
    Declined(String),
    /// Card presented back.
    TakeCard(Farewell),
}

/// A receipt line set.
pub type Receipt = Vec<String>;

/// The ATM's customer-side state.
#[derive(Debug)]
pub struct AtmMachine {
    cards: Vec<TestCard>,
    screen: Screen,
    card: Option<usize>,
    entry: Zeroizing<String>,
    pin: Zeroizing<String>,
    cash: Option<i64>,
    receipt: Option<Receipt>,
    /// The last approved transaction, for the receipt.
    last: Option<(Txn, Outcome)>,
    /// Cards retained (`75`) since start: they never come back out of the machine.
    retained: usize,
    terminal: String,
    currency_exponent: u32,
}

/// Fast-cash amounts in minor units, by side key L1, L2, L3, R1.
pub const FAST_CASH: [i64; 4] = [10_000, 20_000, 50_000, 100_000];
const MAX_PIN: usize = 12;
const MAX_AMOUNT_DIGITS: usize = 7;

/// What the page renders.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineView {
    /// Stable screen id (tests and the page key on it; never on layout).
    pub screen: &'static str,
    /// Headline.
    pub title: String,
    /// Body lines.
    pub lines: Vec<String>,
    /// What has been typed: asterisks for a PIN, the amount for an amount.
    pub entry: Option<String>,
    /// Labels of L1..L4, R1..R4 (`None`: key does nothing).
    pub side: Vec<Option<String>>,
    /// Masked PAN of the card in the slot.
    pub card_in_slot: Option<String>,
    /// Whether the slot presents the card for taking.
    pub card_presented: bool,
    /// Notes in the cash slot (formatted amount).
    pub cash: Option<String>,
    /// Receipt in the receipt slot.
    pub receipt: Option<Receipt>,
    /// The cards the card slot offers (masked PAN and label).
    pub cards: Vec<CardView>,
    /// Cards retained since start.
    pub retained_cards: usize,
    /// Waiting for the switch.
    pub busy: bool,
}

/// A card as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CardView {
    /// Masked PAN.
    pub pan: String,
    /// What it is for.
    pub label: String,
}

impl AtmMachine {
    /// A machine offering `cards`, for terminal `terminal` (printed on receipts).
    pub fn new(cards: Vec<TestCard>, terminal: impl Into<String>) -> Self {
        Self {
            cards,
            screen: Screen::Welcome,
            card: None,
            entry: Zeroizing::new(String::new()),
            pin: Zeroizing::new(String::new()),
            cash: None,
            receipt: None,
            last: None,
            retained: 0,
            terminal: terminal.into(),
            currency_exponent: 2,
        }
    }

    /// The current screen.
    pub fn screen(&self) -> &Screen {
        &self.screen
    }

    /// The card in the slot, and the PIN entered for it, for the shell to build a request.
    pub fn card_and_pin(&self) -> Option<(&TestCard, &str)> {
        let card = self.cards.get(self.card?)?;
        Some((card, self.pin.as_str()))
    }

    /// Handles a key. Returns the transaction the shell must now send, if any (the screen is
    /// then [`Screen::Processing`] until [`AtmMachine::complete`]).
    pub fn press(&mut self, key: Key) -> Option<Txn> {
        use Screen as S;
        if let Key::TakeReceipt = key {
            self.receipt = None;
            return None;
        }
        // Cancel works everywhere a customer could be waiting on the machine, except while
        // the switch is deciding (a real ATM locks the keypad then) and with no card inside.
        if key == Key::Cancel {
            return self.cancel();
        }
        let side = |k: SideKey| key == Key::Side(k);
        match self.screen.clone() {
            S::Welcome => {
                if let Key::InsertCard(i) = key
                    && i < self.cards.len()
                {
                    self.card = Some(i);
                    self.entry.clear();
                    self.pin.clear();
                    self.screen = S::EnterPin {
                        then: None,
                        hint: None,
                    };
                }
                None
            }
            S::EnterPin { then, .. } => match key {
                Key::Digit(d) if self.entry.len() < MAX_PIN => {
                    self.entry.push(char::from(b'0' + d));
                    None
                }
                Key::Clear => {
                    self.entry.clear();
                    None
                }
                Key::Enter | Key::Side(SideKey::R4) => {
                    if self.entry.len() < 4 {
                        self.screen = S::EnterPin {
                            then,
                            hint: Some("A PIN has 4 to 12 digits"),
                        };
                        return None;
                    }
                    self.pin = std::mem::take(&mut self.entry);
                    match then {
                        Some(txn) => self.start(txn),
                        None => {
                            self.screen = S::Menu;
                            None
                        }
                    }
                }
                _ => None,
            },
            S::Menu => {
                if side(SideKey::L1) {
                    self.screen = S::FastCash;
                } else if side(SideKey::L2) {
                    self.entry.clear();
                    self.screen = S::OtherAmount { hint: None };
                } else if side(SideKey::R1) {
                    return self.start(Txn::Balance);
                } else if side(SideKey::R4) {
                    return self.cancel();
                }
                None
            }
            S::FastCash => {
                let pick = match key {
                    Key::Side(SideKey::L1) => Some(FAST_CASH[0]),
                    Key::Side(SideKey::L2) => Some(FAST_CASH[1]),
                    Key::Side(SideKey::L3) => Some(FAST_CASH[2]),
                    Key::Side(SideKey::R1) => Some(FAST_CASH[3]),
                    _ => None,
                };
                if let Some(amount) = pick {
                    return self.start(Txn::Withdraw(amount));
                }
                if side(SideKey::R4) {
                    self.screen = S::Menu;
                }
                None
            }
            S::OtherAmount { .. } => match key {
                Key::Digit(d) if self.entry.len() < MAX_AMOUNT_DIGITS => {
                    if !(self.entry.is_empty() && d == 0) {
                        self.entry.push(char::from(b'0' + d));
                    }
                    None
                }
                Key::Clear => {
                    self.entry.clear();
                    None
                }
                Key::Enter | Key::Side(SideKey::R3) => {
                    let units: i64 = self.entry.parse().unwrap_or(0);
                    if units == 0 {
                        self.screen = S::OtherAmount {
                            hint: Some("Enter an amount, then press Enter"),
                        };
                        return None;
                    }
                    self.entry.clear();
                    self.start(Txn::Withdraw(units * 10i64.pow(self.currency_exponent)))
                }
                Key::Side(SideKey::R4) => {
                    self.entry.clear();
                    self.screen = S::Menu;
                    None
                }
                _ => None,
            },
            S::Processing(_) => None,
            S::Balance { .. } => {
                if side(SideKey::R2) {
                    self.print_receipt();
                    self.screen = S::TakeCard(Farewell::Goodbye);
                } else if side(SideKey::R3) {
                    self.screen = S::Menu;
                } else if side(SideKey::R4) {
                    self.screen = S::TakeCard(Farewell::Goodbye);
                }
                None
            }
            S::TakeCash { .. } => {
                if key == Key::TakeCash {
                    self.cash = None;
                    self.screen = S::ReceiptQuestion;
                } else if side(SideKey::R4) {
                    return self.cancel();
                }
                None
            }
            S::ReceiptQuestion => {
                if side(SideKey::R3) || key == Key::Enter {
                    self.print_receipt();
                    self.screen = S::TakeCard(Farewell::Goodbye);
                } else if side(SideKey::R4) {
                    self.screen = S::TakeCard(Farewell::Goodbye);
                }
                None
            }
            S::WrongPin(txn) => {
                if side(SideKey::R3) || key == Key::Enter {
                    self.entry.clear();
                    self.screen = S::EnterPin {
                        then: Some(txn),
                        hint: None,
                    };
                } else if side(SideKey::R4) {
                    return self.cancel();
                }
                None
            }
            S::InsufficientFunds | S::LimitExceeded => {
                if side(SideKey::R3) {
                    self.screen = S::Menu;
                } else if side(SideKey::R4) {
                    self.screen = S::TakeCard(Farewell::Goodbye);
                }
                None
            }
            S::Unavailable | S::Declined(_) => {
                if side(SideKey::R4) || key == Key::Enter {
                    self.screen = S::TakeCard(Farewell::Goodbye);
                }
                None
            }
            S::CardRetained => {
                if side(SideKey::R4) || key == Key::Enter {
                    self.screen = S::Welcome;
                }
                None
            }
            S::TakeCard(_) => {
                if key == Key::TakeCard {
                    self.end_session();
                    self.screen = S::Welcome;
                }
                None
            }
        }
    }

    fn start(&mut self, txn: Txn) -> Option<Txn> {
        self.screen = Screen::Processing(txn);
        Some(txn)
    }

    fn cancel(&mut self) -> Option<Txn> {
        use Screen as S;
        match self.screen {
            S::Welcome | S::Processing(_) | S::CardRetained | S::TakeCard(_) => None,
            // The customer walks away from the notes: retract them and reverse.
            S::TakeCash { amount } => self.start(Txn::Reverse(amount)),
            _ => {
                self.entry.clear();
                self.screen = S::TakeCard(Farewell::Cancelled);
                None
            }
        }
    }

    fn end_session(&mut self) {
        self.card = None;
        self.entry.clear();
        self.pin.clear();
        self.last = None;
    }

    /// Feeds back the outcome of the transaction [`AtmMachine::press`] asked for. An outcome
    /// while not processing (a late answer) is ignored.
    pub fn complete(&mut self, outcome: Outcome) {
        use Screen as S;
        let S::Processing(txn) = self.screen else {
            return;
        };
        self.screen = match (&outcome, txn) {
            (Outcome::Approved { .. }, Txn::Reverse(_)) => {
                self.cash = None;
                S::TakeCard(Farewell::CashRetracted)
            }
            (_, Txn::Reverse(_)) => {
                self.cash = None;
                S::TakeCard(Farewell::ReversalUnconfirmed)
            }
            (
                Outcome::Approved {
                    available, ledger, ..
                },
                Txn::Balance,
            ) => S::Balance {
                available: *available,
                ledger: *ledger,
            },
            (Outcome::Approved { .. }, Txn::Withdraw(amount)) => {
                self.cash = Some(amount);
                S::TakeCash { amount }
            }
            (Outcome::Declined(code), _) => match code.as_str() {
                "55" => {
                    self.pin.clear();
                    S::WrongPin(txn)
                }
                "75" => {
                    self.end_session();
                    self.retained += 1;
                    S::CardRetained
                }
                "51" => S::InsufficientFunds,
                "61" => S::LimitExceeded,
                "91" | "96" | "58" | "63" => S::Unavailable,
                other => S::Declined(other.to_string()),
            },
            (Outcome::NoAnswer, _) => S::Unavailable,
        };
        if matches!(outcome, Outcome::Approved { .. }) && !matches!(txn, Txn::Reverse(_)) {
            self.last = Some((txn, outcome));
        }
    }

    fn money(&self, minor: i64) -> String {
        let scale = 10i64.pow(self.currency_exponent);
        let sign = if minor < 0 { "-" } else { "" };
        let units = (minor / scale).abs();
        let mut grouped = String::new();
        for (i, c) in units.to_string().chars().rev().enumerate() {
            if i > 0 && i % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        let grouped: String = grouped.chars().rev().collect();
        format!(
            "{sign}{grouped}.{:0width$}",
            (minor % scale).abs(),
            width = self.currency_exponent as usize
        )
    }

    fn print_receipt(&mut self) {
        let Some((
            txn,
            Outcome::Approved {
                auth_code,
                rrn,
                available,
                ..
            },
        )) = &self.last
        else {
            return;
        };
        let card = self
            .card
            .and_then(|i| self.cards.get(i))
            .map(|c| mask_pan(&c.pan))
            .unwrap_or_default();
        let mut lines = vec![
            "SWITCHYARD BANK".to_string(),
            chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            format!("TERMINAL {}", self.terminal),
            format!("CARD {card}"),
        ];
        match txn {
            Txn::Withdraw(amount) => lines.push(format!("WITHDRAWAL {}", self.money(*amount))),
            Txn::Balance => lines.push("BALANCE INQUIRY".into()),
            Txn::Reverse(_) => {}
        }
        if let Some(code) = auth_code {
            lines.push(format!("AUTH CODE {code}"));
        }
        if let Some(rrn) = rrn {
            lines.push(format!("RRN {rrn}"));
        }
        if let Some(available) = available {
            lines.push(format!("AVAILABLE {}", self.money(*available)));
        }
        lines.push("THANK YOU".into());
        self.receipt = Some(lines);
    }

    /// What the page shows now.
    pub fn view(&self) -> MachineView {
        use Screen as S;
        let mut side: Vec<Option<String>> = vec![None; SideKey::ALL.len()];
        let mut label = |k: SideKey, text: &str| side[k.index()] = Some(text.to_string());
        let masked_entry = Some("*".repeat(self.entry.len()));
        let (screen, title, lines, entry): (&'static str, String, Vec<String>, Option<String>) =
            match &self.screen {
                S::Welcome => (
                    "welcome",
                    "Welcome".into(),
                    vec!["Please insert your card".into()],
                    None,
                ),
                S::EnterPin { then, hint } => {
                    label(SideKey::R4, "Enter");
                    let mut lines = vec![match then {
                        Some(_) => "Please re-enter your PIN".to_string(),
                        None => "Please enter your PIN".to_string(),
                    }];
                    lines.extend(hint.map(String::from));
                    ("pin", "Enter PIN".into(), lines, masked_entry)
                }
                S::Menu => {
                    label(SideKey::L1, "Fast cash");
                    label(SideKey::L2, "Other amount");
                    label(SideKey::R1, "Balance");
                    label(SideKey::R4, "Cancel");
                    (
                        "menu",
                        "Select a service".into(),
                        vec!["Choose a transaction with the keys beside the screen".into()],
                        None,
                    )
                }
                S::FastCash => {
                    label(SideKey::L1, &self.money(FAST_CASH[0]));
                    label(SideKey::L2, &self.money(FAST_CASH[1]));
                    label(SideKey::L3, &self.money(FAST_CASH[2]));
                    label(SideKey::R1, &self.money(FAST_CASH[3]));
                    label(SideKey::R4, "Back");
                    (
                        "fast-cash",
                        "Fast cash".into(),
                        vec!["Select an amount".into()],
                        None,
                    )
                }
                S::OtherAmount { hint } => {
                    label(SideKey::R3, "Enter");
                    label(SideKey::R4, "Back");
                    let mut lines =
                        vec!["Enter the amount in whole units, then press Enter".to_string()];
                    lines.extend(hint.map(String::from));
                    (
                        "other-amount",
                        "Other amount".into(),
                        lines,
                        Some(if self.entry.is_empty() {
                            "0".into()
                        } else {
                            self.entry.to_string()
                        }),
                    )
                }
                S::Processing(txn) => (
                    "processing",
                    "Please wait".into(),
                    vec![match txn {
                        Txn::Balance => "Your balance is being requested".into(),
                        Txn::Withdraw(a) => format!("Authorizing withdrawal of {}", self.money(*a)),
                        Txn::Reverse(_) => "Retracting cash and reversing the withdrawal".into(),
                    }],
                    None,
                ),
                S::Balance { available, ledger } => {
                    label(SideKey::R2, "Receipt");
                    label(SideKey::R3, "Another service");
                    label(SideKey::R4, "Finish");
                    let mut lines = Vec::new();
                    if let Some(a) = available {
                        lines.push(format!("Available balance: {}", self.money(*a)));
                    }
                    if let Some(l) = ledger {
                        lines.push(format!("Ledger balance: {}", self.money(*l)));
                    }
                    ("balance", "Your balance".into(), lines, None)
                }
                S::TakeCash { amount } => {
                    label(SideKey::R4, "Cancel");
                    (
                        "take-cash",
                        "Please take your cash".into(),
                        vec![format!("{} is in the cash slot", self.money(*amount))],
                        None,
                    )
                }
                S::ReceiptQuestion => {
                    label(SideKey::R3, "Yes");
                    label(SideKey::R4, "No");
                    (
                        "receipt-question",
                        "Would you like a receipt?".into(),
                        vec![],
                        None,
                    )
                }
                S::WrongPin(_) => {
                    label(SideKey::R3, "Re-enter PIN");
                    label(SideKey::R4, "Cancel");
                    (
                        "wrong-pin",
                        "Incorrect PIN".into(),
                        vec![
                            "The PIN you entered is incorrect".into(),
                            "Your card will be retained after too many wrong PINs".into(),
                        ],
                        None,
                    )
                }
                S::InsufficientFunds => {
                    label(SideKey::R3, "Another service");
                    label(SideKey::R4, "Finish");
                    (
                        "insufficient-funds",
                        "Insufficient funds".into(),
                        vec!["Your account does not have enough funds for this amount".into()],
                        None,
                    )
                }
                S::LimitExceeded => {
                    label(SideKey::R3, "Another service");
                    label(SideKey::R4, "Finish");
                    (
                        "limit-exceeded",
                        "Daily limit exceeded".into(),
                        vec!["This amount exceeds your daily withdrawal limit".into()],
                        None,
                    )
                }
                S::CardRetained => {
                    label(SideKey::R4, "OK");
                    (
                        "card-retained",
                        "Your card has been retained".into(),
                        vec![
                            "The PIN was entered incorrectly too many times".into(),
                            "Please contact your bank".into(),
                        ],
                        None,
                    )
                }
                S::Unavailable => {
                    label(SideKey::R4, "Take card");
                    (
                        "unavailable",
                        "Service temporarily unavailable".into(),
                        vec![
                            "We cannot reach your bank at the moment".into(),
                            "Your account has not been charged".into(),
                        ],
                        None,
                    )
                }
                S::Declined(code) => {
                    label(SideKey::R4, "Take card");
                    (
                        "declined",
                        "Transaction declined".into(),
                        vec![
                            decline_text(code).into(),
                            format!("Response code {code}"),
                            "Please contact your bank".into(),
                        ],
                        None,
                    )
                }
                S::TakeCard(farewell) => (
                    "take-card",
                    "Please take your card".into(),
                    match farewell {
                        Farewell::Goodbye => vec!["Thank you for banking with us".into()],
                        Farewell::Cancelled => vec!["Transaction cancelled".into()],
                        Farewell::CashRetracted => vec![
                            "Transaction cancelled: your cash was retracted".into(),
                            "The withdrawal was reversed; your account has not been charged".into(),
                        ],
                        Farewell::ReversalUnconfirmed => vec![
                            "Your cash was retracted".into(),
                            "The reversal is not confirmed yet; please contact your bank".into(),
                        ],
                    },
                    None,
                ),
            };
        MachineView {
            screen,
            title,
            lines,
            entry,
            side,
            card_in_slot: self
                .card
                .and_then(|i| self.cards.get(i))
                .map(|c| mask_pan(&c.pan)),
            card_presented: matches!(self.screen, S::TakeCard(_)),
            cash: self.cash.map(|a| self.money(a)),
            receipt: self.receipt.clone(),
            cards: self
                .cards
                .iter()
                .map(|c| CardView {
                    pan: mask_pan(&c.pan),
                    label: c.label.clone(),
                })
                .collect(),
            retained_cards: self.retained,
            busy: matches!(self.screen, S::Processing(_)),
        }
    }
}

/// What a customer is told for a decline the machine has no screen of its own for.
fn decline_text(code: &str) -> &'static str {
    match code {
        "14" => "This card is not accepted here",
        "54" => "Your card has expired",
        "62" => "This card is restricted",
        "13" => "The amount is not valid",
        "05" => "Your bank did not authorize this transaction",
        _ => "The transaction could not be completed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn card() -> TestCard {
        TestCard {
            pan: "6011000000000004".into(),
            expiry: "2812".into(),
            currency: "360".into(),
            label: "Everyday".into(),
        }
    }

    fn machine() -> AtmMachine {
        AtmMachine::new(vec![card()], "WEB00001")
    }

    fn press_all(m: &mut AtmMachine, keys: &str) -> Option<Txn> {
        let mut last = None;
        for k in keys.split_whitespace() {
            last = m.press(k.parse().unwrap());
        }
        last
    }

    fn approved(available: i64) -> Outcome {
        Outcome::Approved {
            auth_code: Some("123456".into()),
            rrn: Some("000000000001".into()),
            available: Some(available),
            ledger: Some(available),
        }
    }

    /// Card in, PIN, menu: the PIN is held, the view never shows it.
    fn at_menu() -> AtmMachine {
        let mut m = machine();
        assert_eq!(press_all(&mut m, "insert:0 1 2 3 4 enter"), None);
        assert_eq!(m.screen(), &Screen::Menu);
        m
    }

    #[test]
    fn balance_flow_with_receipt_and_card_returned() {
        let mut m = at_menu();
        assert_eq!(m.card_and_pin().unwrap().1, "1234");
        assert_eq!(press_all(&mut m, "R1"), Some(Txn::Balance));
        assert!(m.view().busy);
        // keys are locked while the switch decides
        assert_eq!(press_all(&mut m, "cancel 5 R4"), None);
        m.complete(approved(500_000));
        let v = m.view();
        assert_eq!(v.screen, "balance");
        assert!(v.lines.iter().any(|l| l.contains("5,000.00")), "{v:?}");
        press_all(&mut m, "R2");
        let v = m.view();
        assert_eq!(v.screen, "take-card");
        let receipt = v.receipt.unwrap();
        assert!(receipt.iter().any(|l| l == "CARD 601100******0004"));
        assert!(receipt.iter().all(|l| !l.contains("6011000000000004")));
        press_all(&mut m, "take-card");
        assert_eq!(m.view().screen, "welcome");
        assert!(m.card_and_pin().is_none());
        press_all(&mut m, "take-receipt");
        assert!(m.view().receipt.is_none());
    }

    #[test]
    fn pin_entry_is_masked_limited_and_validated() {
        let mut m = machine();
        press_all(&mut m, "insert:0 1 2");
        let v = m.view();
        assert_eq!(v.screen, "pin");
        assert_eq!(v.entry.as_deref(), Some("**"));
        press_all(&mut m, "enter");
        assert!(m.view().lines.iter().any(|l| l.contains("4 to 12")));
        press_all(&mut m, "clear 9 9 9 9 9 9 9 9 9 9 9 9 9 9");
        assert_eq!(m.view().entry.as_deref(), Some("************"));
        let json = serde_json::to_string(&m.view()).unwrap();
        assert!(
            !json.contains("999"),
            "the view carries no PIN digits: {json}"
        );
    }

    #[rstest]
    #[case::fast_cash_l1("L1 L1", 10_000)]
    #[case::fast_cash_r1("L1 R1", 100_000)]
    #[case::other_amount("L2 0 2 5 0 enter", 25_000)]
    fn withdrawal_amounts(#[case] keys: &str, #[case] amount: i64) {
        let mut m = at_menu();
        assert_eq!(press_all(&mut m, keys), Some(Txn::Withdraw(amount)));
    }

    #[test]
    fn other_amount_refuses_zero() {
        let mut m = at_menu();
        assert_eq!(press_all(&mut m, "L2 0 enter"), None);
        assert_eq!(m.view().screen, "other-amount");
        assert!(m.view().lines.iter().any(|l| l.contains("Enter an amount")));
    }

    #[test]
    fn withdrawal_cash_then_receipt() {
        let mut m = at_menu();
        press_all(&mut m, "L1 L3");
        m.complete(approved(450_000));
        let v = m.view();
        assert_eq!(v.screen, "take-cash");
        assert_eq!(v.cash.as_deref(), Some("500.00"));
        press_all(&mut m, "take-cash");
        assert_eq!(m.view().screen, "receipt-question");
        assert!(m.view().cash.is_none());
        press_all(&mut m, "R3");
        let v = m.view();
        assert_eq!(v.screen, "take-card");
        let receipt = v.receipt.unwrap();
        assert!(receipt.contains(&"WITHDRAWAL 500.00".to_string()));
        assert!(receipt.contains(&"AUTH CODE 123456".to_string()));
        assert!(receipt.contains(&"AVAILABLE 4,500.00".to_string()));
    }

    #[test]
    fn cancel_while_cash_is_presented_reverses() {
        let mut m = at_menu();
        press_all(&mut m, "L1 L2");
        m.complete(approved(480_000));
        assert_eq!(press_all(&mut m, "cancel"), Some(Txn::Reverse(20_000)));
        m.complete(approved(500_000));
        let v = m.view();
        assert_eq!(v.screen, "take-card");
        assert!(v.cash.is_none());
        assert!(v.lines.iter().any(|l| l.contains("reversed")));
    }

    #[test]
    fn unconfirmed_reversal_is_said() {
        let mut m = at_menu();
        press_all(&mut m, "L1 L2");
        m.complete(approved(480_000));
        press_all(&mut m, "R4");
        m.complete(Outcome::NoAnswer);
        assert!(m.view().lines.iter().any(|l| l.contains("not confirmed")));
    }

    #[rstest]
    #[case::pin("insert:0 1")]
    #[case::menu("insert:0 1 2 3 4 enter")]
    #[case::fast_cash("insert:0 1 2 3 4 enter L1")]
    #[case::other_amount("insert:0 1 2 3 4 enter L2 5")]
    fn cancel_anywhere_returns_the_card(#[case] keys: &str) {
        let mut m = machine();
        press_all(&mut m, keys);
        assert_eq!(press_all(&mut m, "cancel"), None);
        let v = m.view();
        assert_eq!(v.screen, "take-card");
        assert!(v.card_presented);
        assert_eq!(v.lines, vec!["Transaction cancelled".to_string()]);
        press_all(&mut m, "take-card");
        assert_eq!(m.view().screen, "welcome");
    }

    #[test]
    fn wrong_pin_retries_the_same_transaction_with_a_new_pin() {
        let mut m = machine();
        press_all(&mut m, "insert:0 9 9 9 9 enter L1 L1");
        m.complete(Outcome::Declined("55".into()));
        assert_eq!(m.view().screen, "wrong-pin");
        assert_eq!(
            m.card_and_pin().unwrap().1,
            "",
            "the wrong PIN is forgotten"
        );
        press_all(&mut m, "R3");
        assert_eq!(m.view().screen, "pin");
        assert_eq!(
            press_all(&mut m, "1 2 3 4 enter"),
            Some(Txn::Withdraw(10_000))
        );
        assert_eq!(m.card_and_pin().unwrap().1, "1234");
    }

    #[test]
    fn pin_tries_exceeded_retains_the_card() {
        let mut m = machine();
        press_all(&mut m, "insert:0 9 9 9 9 enter R1");
        m.complete(Outcome::Declined("75".into()));
        let v = m.view();
        assert_eq!(v.screen, "card-retained");
        assert_eq!(v.card_in_slot, None);
        assert!(!v.card_presented);
        assert_eq!(v.retained_cards, 1);
        // the card does not come back, whatever is pressed
        press_all(&mut m, "take-card cancel");
        assert_eq!(m.view().screen, "card-retained");
        press_all(&mut m, "R4");
        assert_eq!(m.view().screen, "welcome");
    }

    #[rstest]
    #[case::insufficient("51", "insufficient-funds")]
    #[case::limit("61", "limit-exceeded")]
    #[case::issuer_down("91", "unavailable")]
    #[case::malfunction("96", "unavailable")]
    #[case::not_signed_on("58", "unavailable")]
    #[case::invalid_card("14", "declined")]
    #[case::expired("54", "declined")]
    fn declines_show_their_screens(#[case] code: &str, #[case] screen: &str) {
        let mut m = at_menu();
        press_all(&mut m, "L1 L1");
        m.complete(Outcome::Declined(code.into()));
        assert_eq!(m.view().screen, screen);
        assert!(m.view().card_in_slot.is_some(), "the card is still inside");
    }

    #[test]
    fn no_answer_is_service_unavailable_and_the_card_comes_back() {
        let mut m = at_menu();
        press_all(&mut m, "R1");
        m.complete(Outcome::NoAnswer);
        assert_eq!(m.view().screen, "unavailable");
        press_all(&mut m, "R4");
        assert!(m.view().card_presented);
    }

    #[test]
    fn insufficient_funds_offers_another_service() {
        let mut m = at_menu();
        press_all(&mut m, "L1 R1");
        m.complete(Outcome::Declined("51".into()));
        press_all(&mut m, "R3");
        assert_eq!(m.view().screen, "menu");
    }

    #[test]
    fn late_answers_and_stray_keys_change_nothing() {
        let mut m = machine();
        m.complete(approved(1));
        assert_eq!(m.view().screen, "welcome");
        press_all(&mut m, "insert:7 take-cash take-card R1 5 enter cancel");
        assert_eq!(
            m.view().screen,
            "welcome",
            "no card 7; nothing else applies"
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        assert!("insert:x".parse::<Key>().is_err());
        assert!("R5".parse::<Key>().is_err());
        assert!("10".parse::<Key>().is_err());
        assert_eq!("7".parse::<Key>().unwrap(), Key::Digit(7));
    }

    #[test]
    fn pans_are_masked() {
        assert_eq!(mask_pan("6011000000000004"), "601100******0004");
        assert_eq!(mask_pan("1234"), "****");
        assert!(!format!("{:?}", card()).contains("6011000000000004"));
    }
}
