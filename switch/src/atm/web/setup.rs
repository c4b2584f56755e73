//! Setting the web ATM up from a switch's admin API, as `demo` does for its session: a terminal
//! of its own (fresh TMK delivered under the KEK) and a few test cards, each showing one of the
//! screens a customer can meet (approved, insufficient funds, daily limit, issuer unavailable).

use rand::RngExt;

use super::machine::TestCard;
use crate::atm::provision::{AdminClient, AdminClientError};
use crate::crypto::TerminalKeys;
use crate::domain::TerminalId;

/// The PIN of every provisioned test card (printed on the card's label: these are test cards).
pub const TEST_PIN: &str = "1234";

/// What to provision.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Register this terminal id (default: `WEB` + five random characters).
    pub terminal: Option<TerminalId>,
    /// On-us BIN of the cards to issue.
    pub bin: String,
    /// A BIN the switch routes to an issuer that is down: adds an "issuer unavailable" card
    /// (not issued here; the switch answers `91` for it).
    pub offline_issuer_bin: Option<String>,
    /// ISO 4217 numeric currency of the accounts.
    pub currency: String,
    /// Terminal group.
    pub group: String,
}

impl Default for SetupOptions {
    fn default() -> Self {
        Self {
            terminal: None,
            bin: "6011".into(),
            offline_issuer_bin: None,
            currency: "360".into(),
            group: "web-atm".into(),
        }
    }
}

/// A provisioned terminal and its cards.
#[derive(Debug)]
pub struct Provisioned {
    /// Terminal id.
    pub terminal: TerminalId,
    /// Its keys (TMK only until the first key exchange).
    pub keys: TerminalKeys,
    /// Cards for the card slot.
    pub cards: Vec<TestCard>,
}

fn tag() -> String {
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[rng.random_range(0..32)]))
        .collect()
}

/// A 16-digit PAN under `bin` with a random body and a valid Luhn check digit.
pub fn random_pan(bin: &str) -> String {
    let mut rng = rand::rng();
    let mut pan: String = bin.chars().filter(char::is_ascii_digit).take(11).collect();
    while pan.len() < 15 {
        pan.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
    pan.push(luhn_digit(&pan));
    pan
}

/// The Luhn check digit for `body`.
pub fn luhn_digit(body: &str) -> char {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let dd = d * 2;
                if dd > 9 { dd - 9 } else { dd }
            } else {
                d
            }
        })
        .sum();
    char::from(b'0' + ((10 - sum % 10) % 10) as u8)
}

/// Opens accounts and issues the test cards (on-us), returning them for the card slot.
pub async fn provision_cards(
    admin: &AdminClient,
    options: &SetupOptions,
) -> Result<Vec<TestCard>, AdminClientError> {
    let run = tag();
    // (label, balance, daily limit), minor units
    let plan = [
        ("Everyday account: 5,000.00", 500_000, 300_000),
        ("Low balance: 50.00", 5_000, 300_000),
        ("Daily limit 150.00", 500_000, 15_000),
    ];
    let mut cards = Vec::new();
    for (i, (label, balance, limit)) in plan.into_iter().enumerate() {
        let account = format!("WEB-{run}-{}", i + 1);
        admin
            .create_account(&account, &options.currency, balance, limit)
            .await?;
        let card = TestCard {
            pan: random_pan(&options.bin),
            expiry: "3012".into(),
            currency: options.currency.clone(),
            label: format!("{label} (PIN {TEST_PIN})"),
        };
        admin
            .create_card(&card.pan, &card.expiry, &account, TEST_PIN)
            .await?;
        cards.push(card);
    }
    if let Some(bin) = &options.offline_issuer_bin {
        cards.push(TestCard {
            pan: random_pan(bin),
            expiry: "3012".into(),
            currency: options.currency.clone(),
            label: format!("Another bank's card, issuer offline (PIN {TEST_PIN})"),
        });
    }
    Ok(cards)
}

/// Registers a terminal with a fresh TMK and issues the test cards.
pub async fn provision(
    admin: &AdminClient,
    kek: &[u8],
    options: &SetupOptions,
) -> Result<Provisioned, AdminClientError> {
    let terminal = match &options.terminal {
        Some(t) => t.clone(),
        None => TerminalId::new(format!("WEB{}", tag()))
            .map_err(|e| AdminClientError::Crypto(e.to_string()))?,
    };
    let keys = admin
        .register_terminal(kek, &terminal, &options.group)
        .await?;
    let cards = provision_cards(admin, options).await?;
    Ok(Provisioned {
        terminal,
        keys,
        cards,
    })
}

/// Parses `--card PAN:YYMM[:label]` (a card already issued on the switch).
pub fn parse_card(spec: &str, currency: &str) -> Result<TestCard, String> {
    let mut parts = spec.splitn(3, ':');
    let pan = parts.next().unwrap_or_default();
    let expiry = parts.next().unwrap_or_default();
    if !(12..=19).contains(&pan.len()) || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a card is PAN:YYMM[:label] with a 12 to 19 digit PAN".into());
    }
    if expiry.len() != 4 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a card's expiry is YYMM".into());
    }
    Ok(TestCard {
        pan: pan.into(),
        expiry: expiry.into(),
        currency: currency.into(),
        label: parts.next().unwrap_or("Test card").into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_of_known_pans() {
        assert_eq!(luhn_digit("601100000000000"), '4');
        assert_eq!(luhn_digit("411111111111111"), '1');
        let pan = random_pan("6011");
        assert_eq!(pan.len(), 16);
        assert!(pan.starts_with("6011"));
        assert_eq!(luhn_digit(&pan[..15]), pan.chars().last().unwrap());
    }

    #[test]
    fn card_specs() {
        let c = parse_card("6011000000000004:2812:Mine", "360").unwrap();
        assert_eq!((c.expiry.as_str(), c.label.as_str()), ("2812", "Mine"));
        assert!(parse_card("6011:2812", "360").is_err());
        assert!(parse_card("6011000000000004:28", "360").is_err());
    }
}
