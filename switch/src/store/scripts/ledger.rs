//! Accounts, cards, PIN tries, and the two money scripts: authorize and reverse.
//!
//! Locks (PostgreSQL; SQLite's single writer makes them unnecessary there): the request
//! identity first (an advisory lock shared by a request and its reversals), then the original
//! journal row of a reversal, then the account row before its balance is read.

use chrono::Utc;

use super::super::sql::{Arg, Conn, Step};
use super::super::*;
use super::common::*;
use crate::domain::ResponseCode;

const MARK_REVERSED: &str = "UPDATE journal SET reversed = TRUE WHERE id = $1";

pub(crate) async fn create_account(
    c: &mut impl Conn,
    a: &NewAccount,
    actor: &str,
) -> Result<Account, StoreError> {
    validate_new_account(a)?;
    let now = micros(Utc::now());
    let done = c
        .execute(
            "INSERT INTO accounts (id, currency, balance, daily_withdrawal_limit, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[
                Arg::from(a.id.as_str()),
                Arg::from(&a.currency),
                Arg::from(a.balance),
                Arg::from(a.daily_withdrawal_limit),
                Arg::from(now),
            ],
        )
        .await?;
    if done == 0 {
        return Err(StoreError::conflict(format!("account {}", a.id)));
    }
    let detail = serde_json::json!({
        "currency": a.currency, "balance": a.balance,
        "dailyWithdrawalLimit": a.daily_withdrawal_limit,
    });
    write_audit(
        c,
        now,
        &audit(actor, "account.create", a.id.as_str(), detail),
    )
    .await?;
    Ok(Account {
        id: a.id.clone(),
        currency: a.currency.clone(),
        balance: a.balance,
        daily_withdrawal_limit: a.daily_withdrawal_limit,
        created_at: now,
    })
}

pub(crate) async fn get_account(
    c: &mut impl Conn,
    id: &AccountId,
) -> Result<Option<Account>, StoreError> {
    c.query_opt(
        select!(ACCOUNT_COLS, "FROM accounts WHERE id = $1"),
        &[Arg::from(id.as_str())],
    )
    .await?
    .as_ref()
    .map(account_from_row)
    .transpose()
}

pub(crate) async fn create_card(
    c: &mut impl Conn,
    card: &NewCard,
    actor: &str,
) -> Result<Card, StoreError> {
    validate_new_card(card)?;
    let now = micros(Utc::now());
    let account: Option<String> = c
        .scalar_opt(
            "SELECT id FROM accounts WHERE id = $1",
            &[Arg::from(card.account_id.as_str())],
        )
        .await?;
    if account.is_none() {
        return Err(StoreError::not_found(format!(
            "account {}",
            card.account_id
        )));
    }
    let id = CardId::generate();
    let done = c
        .execute(
            "INSERT INTO cards (id, pan_token, last4, expiry, account_id, pvv, pin_tries, \
             upstream, created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8) \
             ON CONFLICT (pan_token) DO NOTHING",
            &[
                Arg::from(id.as_str()),
                Arg::from(&card.pan_token),
                Arg::from(&card.last4),
                Arg::from(&card.expiry),
                Arg::from(card.account_id.as_str()),
                Arg::from(&card.pvv),
                Arg::from(card.upstream.as_deref()),
                Arg::from(now),
            ],
        )
        .await?;
    if done == 0 {
        return Err(StoreError::conflict(format!(
            "card ending {}: this PAN is already registered",
            card.last4
        )));
    }
    let detail = serde_json::json!({
        "last4": card.last4, "expiry": card.expiry, "accountId": card.account_id.as_str(),
        "upstream": card.upstream,
    });
    write_audit(c, now, &audit(actor, "card.create", id.as_str(), detail)).await?;
    Ok(Card {
        id,
        pan_token: card.pan_token.clone(),
        last4: card.last4.clone(),
        expiry: card.expiry.clone(),
        account_id: card.account_id.clone(),
        pvv: card.pvv.clone(),
        pin_tries: 0,
        pin_blocked: false,
        upstream: card.upstream.clone(),
        created_at: now,
    })
}

pub(crate) async fn get_card(c: &mut impl Conn, id: &CardId) -> Result<Option<Card>, StoreError> {
    c.query_opt(
        select!(CARD_COLS, "FROM cards WHERE id = $1"),
        &[Arg::from(id.as_str())],
    )
    .await?
    .as_ref()
    .map(card_from_row)
    .transpose()
}

pub(crate) async fn find_card(
    c: &mut impl Conn,
    pan_token: &str,
) -> Result<Option<Card>, StoreError> {
    c.query_opt(
        select!(CARD_COLS, "FROM cards WHERE pan_token = $1"),
        &[Arg::from(pan_token)],
    )
    .await?
    .as_ref()
    .map(card_from_row)
    .transpose()
}

pub(crate) async fn reserve_pin_try(
    c: &mut impl Conn,
    card: &CardId,
    now: DateTime<Utc>,
) -> Result<PinReservation, StoreError> {
    let now = micros(now);
    let reserved: Option<i64> = c
        .scalar_opt(
            RESERVE_PIN_TRY,
            &[
                Arg::from(card.as_str()),
                Arg::from(now),
                Arg::from(pin_reservation_cutoff(now)),
            ],
        )
        .await?;
    if reserved.is_some() {
        return Ok(PinReservation::Reserved);
    }
    let settled: Option<i64> = c
        .scalar_opt(
            "SELECT pin_tries FROM cards WHERE id = $1",
            &[Arg::from(card.as_str())],
        )
        .await?;
    match settled {
        Some(tries) if tries >= i64::from(PIN_TRIES_LIMIT) => Ok(PinReservation::Exhausted),
        Some(_) => Ok(PinReservation::InFlight),
        None => Err(StoreError::not_found(format!("card {card}"))),
    }
}

pub(crate) async fn release_pin_try(c: &mut impl Conn, card: &CardId) -> Result<(), StoreError> {
    let done = c
        .execute(RELEASE_PIN_TRY, &[Arg::from(card.as_str())])
        .await?;
    if done == 0 {
        return Err(StoreError::not_found(format!("card {card}")));
    }
    Ok(())
}

pub(crate) async fn reset_pin(
    c: &mut impl Conn,
    card: &CardId,
    pvv: &str,
    actor: &str,
) -> Result<(), StoreError> {
    if pvv.is_empty() {
        return Err(StoreError::invalid("pvv: empty"));
    }
    let now = micros(Utc::now());
    let done = c
        .execute(
            "UPDATE cards SET pvv = $2, pin_tries = 0 WHERE id = $1",
            &[Arg::from(card.as_str()), Arg::from(pvv)],
        )
        .await?;
    if done == 0 {
        return Err(StoreError::not_found(format!("card {card}")));
    }
    write_audit(
        c,
        now,
        &audit(
            actor,
            "card.pin-reset",
            card.as_str(),
            serde_json::json!({}),
        ),
    )
    .await
}

pub(crate) async fn find_request(
    c: &mut impl Conn,
    id: &RequestIdentity,
) -> Result<Option<JournalEntry>, StoreError> {
    Ok(load_journal(c, id).await?.map(|(_, e)| e))
}

/// How often a posting is decided again because what it read changed before it was written.
/// Each round some competing posting committed, so this only runs out under a flood of
/// requests for one card or account; the request is then answered `96`.
const POSTING_ROUNDS: usize = 32;

/// The view's columns: one table's columns as `<alias>_<name>`.
fn aliased(cols: &str, alias: &str) -> String {
    cols.split(',')
        .map(|c| {
            let c = c.trim();
            format!("{alias}.{c} AS {alias}_{c}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The view, by card id or by PAN token (`$4`). One statement: `$1..$3` the identity, `$5` an
/// account other than the card's, `$6` the day.
fn view_sql(card_column: &str) -> String {
    format!(
        "SELECT {}, {}, {}, \
         EXISTS (SELECT 1 FROM journal r WHERE r.kind = 'reversal' AND \
                 r.orig_terminal_id = $1 AND r.orig_stan = $2 AND r.orig_transmission = $3) \
             AS reversed_before, \
         COALESCE(d.total, 0) AS withdrawn \
         FROM (SELECT 1 AS one) AS one \
         LEFT JOIN journal j ON j.terminal_id = $1 AND j.stan = $2 AND j.transmission = $3 \
         LEFT JOIN cards c ON c.{card_column} = $4 \
         LEFT JOIN accounts a ON a.id = COALESCE($5, c.account_id) \
         LEFT JOIN daily_withdrawals d ON d.account_id = a.id AND d.day = $6",
        aliased(JOURNAL_COLS, "j"),
        aliased(CARD_COLS, "c"),
        aliased(ACCOUNT_COLS, "a"),
    )
}

static VIEW_BY_CARD_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| view_sql("id"));
static VIEW_BY_PAN_TOKEN: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| view_sql("pan_token"));

/// Reads everything an authorization is decided on, in one statement.
pub(crate) async fn read_view(c: &mut impl Conn, key: ViewKey) -> Result<AuthView, StoreError> {
    Ok(read_view_holding(c, key, None).await?.0)
}

/// A forced post's share of its station's per-day ceiling: taken before the posting is decided
/// (with the view read, in the same statement), so that the station's one row per day is held
/// only for that short statement and not through each posting's commit — every advice of a
/// station adds to that row, and holding it through a durable commit made a station's advices
/// post one fsync at a time. A posting that does not debit gives it back in the same statement;
/// a request that ends in an error gives it back on its own.
#[derive(Clone, Copy)]
struct StationHold {
    amount: i64,
    per_day: i64,
}

impl StationHold {
    /// Takes the share if the day's total stays within the ceiling.
    fn take<'a>(&self, station: &'a TerminalId, day: &'a str) -> Step<'a> {
        Step {
            sql: "INSERT INTO station_advice_days (station_id, day, total) \
                  SELECT $1, $2, $3 WHERE $3 <= $4{after} \
                  ON CONFLICT (station_id, day) DO UPDATE \
                  SET total = station_advice_days.total + excluded.total \
                  WHERE station_advice_days.total + excluded.total <= $4",
            args: vec![
                Arg::from(station.as_str()),
                Arg::from(day),
                Arg::from(self.amount),
                Arg::from(self.per_day),
            ],
            required: true,
            yields: None,
        }
    }

    /// Gives the share back.
    fn give_back<'a>(&self, station: &'a TerminalId, day: &'a str) -> Step<'a> {
        Step {
            sql: "UPDATE station_advice_days SET total = total - $3 \
                  WHERE station_id = $1 AND day = $2 AND total >= $3{after}",
            args: vec![
                Arg::from(station.as_str()),
                Arg::from(day),
                Arg::from(self.amount),
            ],
            required: true,
            yields: None,
        }
    }
}

/// [`read_view`], taking a station's share of its ceiling in the same statement when asked
/// (see [`StationHold`]); says whether it was taken.
async fn read_view_holding(
    c: &mut impl Conn,
    key: ViewKey,
    hold: Option<StationHold>,
) -> Result<(AuthView, bool), StoreError> {
    let station_step = match (&hold, &key.station) {
        (Some(hold), Some(station)) => Some(hold.take(station, &key.day)),
        _ => None,
    };
    let (sql, card) = match &key.card {
        Some(CardLookup::PanToken(token)) => (&*VIEW_BY_PAN_TOKEN, Some(token.as_str())),
        Some(CardLookup::Id(id)) => (&*VIEW_BY_CARD_ID, Some(id.as_str())),
        None => (&*VIEW_BY_CARD_ID, None),
    };
    let args = [
        Arg::from(key.identity.terminal_id.as_str()),
        Arg::from(&key.identity.stan),
        Arg::from(&key.identity.transmission),
        Arg::from(card),
        Arg::from(key.account.as_ref().map(AccountId::as_str)),
        Arg::from(&key.day),
    ];
    let mut held = false;
    let (row, reserved) = match (key.reserve_pin_at, card) {
        (Some(at), Some(card)) => {
            if let Some(step) = &station_step {
                // both (no request asks for both today): the share first, on its own
                held = c.execute_step(step).await? > 0;
            }
            let at = micros(at);
            let step = Step {
                sql: match &key.card {
                    Some(CardLookup::PanToken(_)) => RESERVE_PIN_TRY_BY_TOKEN,
                    _ => RESERVE_PIN_TRY_BY_ID,
                },
                args: vec![
                    Arg::from(card),
                    Arg::from(at),
                    Arg::from(pin_reservation_cutoff(at)),
                ],
                required: false,
                yields: None,
            };
            let (reserved, rows) = c.query_after(&step, sql, &args).await?;
            let row = rows
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::corrupt("the authorization view returned no row"))?;
            (row, Some(reserved))
        }
        _ => match &station_step {
            Some(step) => {
                let (taken, rows) = c.query_after(step, sql, &args).await?;
                held = taken;
                let row = rows
                    .into_iter()
                    .next()
                    .ok_or_else(|| StoreError::corrupt("the authorization view returned no row"))?;
                (row, None)
            }
            None => (c.query_one(sql, &args).await?, None),
        },
    };
    let card = row.part("c_").as_ref().map(card_from_row).transpose()?;
    let pin_reservation = match (&card, reserved) {
        (Some(_), Some(true)) => Some(PinReservation::Reserved),
        (Some(card), Some(false)) if card.pin_blocked => Some(PinReservation::Exhausted),
        (Some(_), Some(false)) => Some(PinReservation::InFlight),
        _ => None,
    };
    let view = AuthView {
        pin_reservation,
        journal: row.part("j_").as_ref().map(journal_from_row).transpose()?,
        reversed_before: row.try_get("reversed_before")?,
        card,
        account: row.part("a_").as_ref().map(account_from_row).transpose()?,
        withdrawn: row.try_get("withdrawn")?,
        key,
    };
    Ok((view, held))
}

/// What the store reads for `req` on `day` when the caller brought no view.
fn view_key(req: &AuthRequest, day: &str) -> ViewKey {
    ViewKey {
        identity: req.identity.clone(),
        card: req.card_id.clone().map(CardLookup::Id),
        account: req.account_id.clone(),
        station: req.force_post.then(|| req.identity.terminal_id.clone()),
        day: day.to_string(),
        reserve_pin_at: None,
    }
}

/// Whether the caller's view holds what `req` is decided on.
fn view_fits(view: &AuthView, req: &AuthRequest, day: &str) -> bool {
    let card_id = view.card.as_ref().map(|c| &c.id);
    let account_id = view.account.as_ref().map(|a| &a.id);
    view.key.identity == req.identity
        && view.key.day == day
        && (req.card_id.is_none() || card_id == req.card_id.as_ref())
        && (req.account_id.is_none() || account_id == req.account_id.as_ref())
        && (!req.force_post || view.key.station.as_ref() == Some(&req.identity.terminal_id))
}

/// Authorizes on a view (the caller's, or read here), then writes the decision in one guarded
/// posting; when the posting finds the view stale, reads again and decides again. A forced post
/// under a station ceiling holds its share of the ceiling from the first read on (see
/// [`StationHold`]).
pub(crate) async fn authorize(
    c: &mut impl Conn,
    mut req: AuthRequest,
) -> Result<AuthOutcome, StoreError> {
    validate_auth_request(&req)?;
    let day = utc_day(micros(req.now));
    let wanted = station_hold(&req);
    let mut held = None;
    let outcome = authorize_holding(c, &mut req, &day, wanted, &mut held).await;
    if let (Err(_), Some(hold)) = (&outcome, held) {
        // the request ends without a posting: its share goes back (if this fails too, the
        // station can take less that day, never more)
        let station = &req.identity.terminal_id;
        if let Err(err) = c.execute_step(&hold.give_back(station, &day)).await {
            tracing::warn!(%station, amount = hold.amount, error = %err,
                "a forced post's share of its station's ceiling could not be given back; \
                 the station's day counts it until the day ends");
        }
    }
    outcome
}

/// The share of its station's ceiling `req` takes, if it is a forced post under one and within
/// the per-advice ceiling (above it, the decision refuses it).
fn station_hold(req: &AuthRequest) -> Option<StationHold> {
    let ceiling = req.force_post_ceiling.filter(|_| req.force_post)?;
    match req.kind {
        AuthKind::Withdrawal { amount } if amount > 0 && amount <= ceiling.per_advice => {
            Some(StationHold {
                amount,
                per_day: ceiling.per_day,
            })
        }
        _ => None,
    }
}

/// [`authorize`]'s rounds; `held` says whether the station share is held (to give back if this
/// ends in an error).
async fn authorize_holding(
    c: &mut impl Conn,
    req: &mut AuthRequest,
    day: &str,
    wanted: Option<StationHold>,
    held: &mut Option<StationHold>,
) -> Result<AuthOutcome, StoreError> {
    let mut seen = req.seen.take().filter(|v| view_fits(v, req, day));
    for round in 0..POSTING_ROUNDS {
        // taken once; a posting decided again keeps it
        let want = wanted.filter(|_| round == 0);
        let view = match (seen.take(), want) {
            (Some(view), None) => view,
            (Some(view), Some(hold)) => {
                let step = hold.take(&req.identity.terminal_id, day);
                if c.execute_step(&step).await? > 0 {
                    *held = Some(hold);
                }
                view
            }
            (None, want) => {
                let (view, taken) = read_view_holding(c, view_key(req, day), want).await?;
                if taken {
                    *held = want;
                }
                view
            }
        };
        let mut posting = match decide(req, &view, held.is_some())? {
            Decision::Answered(outcome) => {
                // a duplicate: the original counted its PIN try and its share of the ceiling;
                // this one gives its own back
                if let Some(pin) = &req.pin_try {
                    c.execute(RELEASE_PIN_TRY, &[Arg::from(pin.card_id.as_str())])
                        .await?;
                }
                if let Some(hold) = held.take() {
                    let step = hold.give_back(&req.identity.terminal_id, day);
                    c.execute_step(&step).await?;
                }
                return Ok(*outcome);
            }
            Decision::Post(posting) => posting,
        };
        if !posting.forced() {
            // held, but nothing to debit (a decline, a reversed original): given back with the
            // journal row
            posting.give_back = *held;
        }
        match c.apply_all(&posting.steps()).await {
            Ok(balance) => {
                *held = None;
                let forced = posting.forced();
                let mut entry = posting.entry;
                if forced {
                    // the balance the forced debit left, read back in the same statement
                    entry.ledger_balance = balance;
                    entry.available_balance = balance;
                }
                return Ok(AuthOutcome::Done(entry));
            }
            Err(StoreError::Stale) => continue,
            Err(err) => return Err(err),
        }
    }
    Err(StoreError::Unavailable(
        format!(
            "request {}/{}: its card or account changed under it {POSTING_ROUNDS} times",
            req.identity.terminal_id, req.identity.stan
        )
        .into(),
    ))
}

/// What an authorization comes to on one view. (No `Debug`: a posting holds the PVV.)
enum Decision {
    /// Nothing to write: a duplicate (its original answer) or other content under a used
    /// identity.
    Answered(Box<AuthOutcome>),
    /// Write this.
    Post(Box<Posting>),
}

/// A decided authorization: the journal row, and each row it changes with the value the
/// decision read there (the guard).
struct Posting {
    entry: JournalEntry,
    /// The row a reversal placed for this identity before it arrived, to fill in.
    placeholder: bool,
    account_id: Option<AccountId>,
    card_id: Option<CardId>,
    business_day: Option<String>,
    /// The request's UTC day (the station's ceiling day).
    day: String,
    /// The PIN try settled: (tries read, tries now, PVV read).
    pin: Option<(i64, i64, String)>,
    /// The account's debit and the day's total.
    debit: Option<Debit>,
    /// The station's share of its ceiling this request holds but does not use.
    give_back: Option<StationHold>,
    /// (advice, its reference, its payload as JSON text).
    advice: Option<(NewAdvice, String, String)>,
}

/// How an approved withdrawal changes the account and the day's total.
enum Debit {
    /// Set to what the decision computed, guarded by what it read (the balance and the limit
    /// it checked, the currency, the day's total).
    Checked {
        balance_read: i64,
        limit_read: i64,
        currency: String,
        balance: i64,
        withdrawn_read: i64,
        withdrawn: i64,
    },
    /// A forced post (a stand-in advice: approved whatever the balance and the limit, SPEC §6):
    /// subtracted from the balance and added to the day's total as they are when the posting
    /// runs, guarded only by the currency, so advices to one account never make each other
    /// decide again. The journal row takes the balance from the updated account row in the
    /// same posting.
    Forced { amount: i64, currency: String },
}

/// The rules, in the order the cardholder should hear of them: a duplicate; the PIN (counted
/// even when something else declines); the caller's decline; a reversal that came first; the
/// issuer's answer; then the account — currency, and for a withdrawal the station's ceilings,
/// the daily limit and the balance. Pure: the view, and `held` (the request holds its share of
/// its station's per-day ceiling, see [`StationHold`]), are all it looks at.
fn decide(req: &AuthRequest, view: &AuthView, held: bool) -> Result<Decision, StoreError> {
    let now = micros(req.now);
    if let Some((digest, entry)) = view.answered() {
        return Ok(Decision::Answered(Box::new(if digest == req.digest {
            AuthOutcome::Duplicate(entry.clone())
        } else {
            AuthOutcome::ContentMismatch
        })));
    }
    let placeholder = view.journal.is_some();
    let (kind, amount) = match req.kind {
        AuthKind::Balance => (JournalKind::Balance, None),
        AuthKind::Withdrawal { amount } => (JournalKind::Withdrawal, Some(amount)),
    };
    let mut posting = Posting {
        entry: JournalEntry {
            id: uuid::Uuid::new_v4().to_string(),
            identity: req.identity.clone(),
            digest: req.digest.clone(),
            mti: req.mti.clone(),
            kind,
            amount,
            currency: req.currency.clone(),
            response_code: String::new(),
            rrn: req.rrn.clone(),
            auth_code: None,
            ledger_balance: None,
            available_balance: None,
            reversed: false,
            upstream_ref: req.upstream_ref.clone(),
            created_at: now,
        },
        placeholder,
        account_id: req.account_id.clone(),
        card_id: req.card_id.clone(),
        business_day: None,
        day: view.key.day.clone(),
        pin: None,
        debit: None,
        give_back: None,
        advice: None,
    };
    if let Some((_, row)) = &view.journal {
        posting.entry.id = row.id.clone();
    }
    let done = |mut posting: Posting, code: ResponseCode| {
        posting.entry.response_code = code.as_str().to_string();
        Ok(Decision::Post(Box::new(posting)))
    };

    // the PIN count and the journal row that explains it are written together
    let mut pin_code = None;
    if let Some(pin) = &req.pin_try {
        let card = view
            .card
            .as_ref()
            .filter(|c| c.id == pin.card_id)
            .ok_or_else(|| StoreError::not_found(format!("card {}", pin.card_id)))?;
        if card.pvv != pin.pvv {
            // the PIN was reset after it was checked: check it again
            return Err(StoreError::Stale);
        }
        // settled with its reservation given back (see `PinTry`)
        let tries = i64::from(card.pin_tries);
        let settled = if card.pin_blocked {
            pin_code = Some(ResponseCode::PinTriesExceeded);
            tries
        } else if !pin.correct {
            pin_code = Some(wrong_pin_code(tries + 1));
            tries + 1
        } else {
            0
        };
        posting.pin = Some((tries, settled, card.pvv.clone()));
    }
    if let Some(code) = pin_code.or(req.decline) {
        return done(posting, code);
    }

    // the terminal gave up on this request and reversed it before it reached us (or while
    // it was in flight): apply nothing, so the reversal and the request net to zero
    if placeholder || view.reversed_before {
        posting.entry.reversed = true;
        return done(posting, ResponseCode::NoActionTaken);
    }

    if let Some(issuer) = &req.issuer_answer {
        let (code, answer) = issuer_journal_answer(issuer);
        posting.entry.auth_code = answer.auth_code.map(str::to_string);
        posting.entry.ledger_balance = answer.ledger;
        posting.entry.available_balance = answer.available;
        return done(posting, code);
    }

    let account_id = req
        .account_id
        .as_ref()
        .ok_or_else(|| StoreError::invalid("accountId: required to authorize"))?;
    let account = view
        .account
        .as_ref()
        .filter(|a| &a.id == account_id)
        .ok_or_else(|| StoreError::not_found(format!("account {account_id}")))?;
    if account.currency != req.currency {
        // no currency conversion in the switch: refuse rather than debit the wrong amount
        return done(posting, ResponseCode::InvalidTransaction);
    }
    let amount = match req.kind {
        AuthKind::Balance => {
            posting.entry.ledger_balance = Some(account.balance);
            posting.entry.available_balance = Some(account.balance);
            posting.entry.auth_code = Some(req.auth_code.clone());
            return done(posting, ResponseCode::Approved);
        }
        AuthKind::Withdrawal { amount } => amount,
    };
    if let Some(ceiling) = req.force_post_ceiling.filter(|_| req.force_post)
        && amount > 0
    {
        let station = &req.identity.terminal_id;
        if let Some(refused) = over_advice_ceiling(station, amount, &ceiling) {
            return Err(refused);
        }
        if !held {
            return Err(over_daily_ceiling(station, amount, &ceiling));
        }
    }
    let code = withdrawal_decision(
        amount,
        account.balance,
        view.withdrawn,
        account.daily_withdrawal_limit,
        req.force_post,
    );
    if code != ResponseCode::Approved {
        return done(posting, code);
    }
    posting.business_day = Some(view.key.day.clone());
    if req.force_post {
        // the balance is known once the debit has run (see `Debit::Forced`)
        posting.debit = Some(Debit::Forced {
            amount,
            currency: account.currency.clone(),
        });
    } else {
        // never overdraws: the decision checked the balance
        let balance = account.balance - amount;
        let withdrawn = view
            .withdrawn
            .checked_add(amount)
            .ok_or_else(|| StoreError::invalid(format!("amount {amount}: out of range")))?;
        posting.debit = Some(Debit::Checked {
            balance_read: account.balance,
            limit_read: account.daily_withdrawal_limit,
            currency: account.currency.clone(),
            balance,
            withdrawn_read: view.withdrawn,
            withdrawn,
        });
        posting.entry.ledger_balance = Some(balance);
        posting.entry.available_balance = Some(balance);
    }
    posting.entry.auth_code = Some(req.auth_code.clone());
    if let Some(advice) = &req.advice {
        saf::validate_new_advice(advice)?;
        let reference = advice
            .reference
            .clone()
            .unwrap_or_else(|| posting.entry.id.clone());
        posting.advice = Some((advice.clone(), reference, advice.payload.to_string()));
    }
    done(posting, ResponseCode::Approved)
}

impl Posting {
    /// Whether the posting is a forced debit (its balance is known once it has run).
    fn forced(&self) -> bool {
        matches!(self.debit, Some(Debit::Forced { .. }))
    }

    /// The guarded writes, in the order every posting takes its rows: the journal row (a
    /// concurrent copy of the request loses here, before it locks anything), the card, the
    /// account, the day's totals, the advice. A forced post writes its journal row after the
    /// debit, whose balance it records.
    fn steps(&self) -> Vec<Step<'_>> {
        let e = &self.entry;
        let mut steps = Vec::with_capacity(6);
        let forced = self.forced();
        let mut journal = Step {
            sql: match (self.placeholder, forced) {
                (true, _) => ADOPT_PLACEHOLDER,
                (false, false) => INSERT_JOURNAL,
                (false, true) => INSERT_FORCED_JOURNAL,
            },
            args: vec![
                Arg::from(&e.id),
                Arg::from(&e.digest),
                Arg::from(&e.mti),
                Arg::from(e.kind.as_str()),
                Arg::from(e.amount),
                Arg::from(&e.currency),
                Arg::from(&e.response_code),
                Arg::from(&e.rrn),
                Arg::from(e.auth_code.as_deref()),
                Arg::from(e.ledger_balance),
                Arg::from(e.available_balance),
                Arg::from(self.account_id.as_ref().map(AccountId::as_str)),
                Arg::from(self.card_id.as_ref().map(CardId::as_str)),
                Arg::from(self.business_day.as_deref()),
                Arg::from(e.reversed),
                Arg::from(e.upstream_ref.as_deref()),
                Arg::from(e.created_at),
                Arg::from(e.identity.terminal_id.as_str()),
                Arg::from(&e.identity.stan),
                Arg::from(&e.identity.transmission),
            ],
            required: true,
            yields: None,
        };
        if forced {
            // no balances of its own (see INSERT_FORCED_JOURNAL)
            journal.args.drain(9..11);
        }
        let mut journal = Some(journal);
        if !forced {
            steps.extend(journal.take());
        }
        if let (Some((read, now, pvv)), Some(card)) = (&self.pin, &self.card_id) {
            steps.push(Step {
                sql: "UPDATE cards SET pin_tries = $2, pin_pending = CASE WHEN pin_pending > 0 \
                      THEN pin_pending - 1 ELSE 0 END \
                      WHERE id = $1 AND pin_tries = $3 AND pvv = $4{after}",
                args: vec![
                    Arg::from(card.as_str()),
                    Arg::from(*now),
                    Arg::from(*read),
                    Arg::from(pvv),
                ],
                required: true,
                yields: None,
            });
        }
        if let (Some(debit), Some(account), Some(day)) =
            (&self.debit, &self.account_id, &self.business_day)
        {
            steps.extend(debit_steps(debit, account, day));
        }
        if let Some(hold) = &self.give_back {
            steps.push(hold.give_back(&e.identity.terminal_id, &self.day));
        }
        steps.extend(journal);
        if let Some((a, reference, payload)) = &self.advice {
            // already queued under its key: left as it is
            steps.push(Step {
                sql: INSERT_ADVICE,
                args: vec![
                    Arg::from(&a.destination),
                    Arg::from(i64::from(a.priority)),
                    Arg::from(a.mti.mti()),
                    Arg::from(&a.idempotency_key),
                    Arg::Json(payload),
                    Arg::from(reference),
                    Arg::from(micros(a.created_at)),
                ],
                required: false,
                yields: None,
            });
        }
        steps
    }
}

/// The account's and the day's total's steps of a posting.
fn debit_steps<'a>(debit: &'a Debit, account: &'a AccountId, day: &'a str) -> [Step<'a>; 2] {
    match debit {
        Debit::Checked {
            balance_read,
            limit_read,
            currency,
            balance,
            withdrawn_read,
            withdrawn,
        } => [
            Step {
                sql: "UPDATE accounts SET balance = $2 WHERE id = $1 AND balance = $3 \
                      AND daily_withdrawal_limit = $4 AND currency = $5{after}",
                args: vec![
                    Arg::from(account.as_str()),
                    Arg::from(*balance),
                    Arg::from(*balance_read),
                    Arg::from(*limit_read),
                    Arg::from(currency),
                ],
                required: true,
                yields: None,
            },
            Step {
                sql: "INSERT INTO daily_withdrawals (account_id, day, total) \
                      SELECT $1, $2, $3 WHERE TRUE{after} \
                      ON CONFLICT (account_id, day) DO UPDATE SET total = excluded.total \
                      WHERE daily_withdrawals.total = $4",
                args: vec![
                    Arg::from(account.as_str()),
                    Arg::from(day),
                    Arg::from(*withdrawn),
                    Arg::from(*withdrawn_read),
                ],
                required: true,
                yields: None,
            },
        ],
        Debit::Forced { amount, currency } => [
            Step {
                sql: "UPDATE accounts SET balance = balance - $2 \
                      WHERE id = $1 AND currency = $3{after}",
                args: vec![
                    Arg::from(account.as_str()),
                    Arg::from(*amount),
                    Arg::from(currency),
                ],
                required: true,
                yields: Some("balance"),
            },
            Step {
                sql: "INSERT INTO daily_withdrawals (account_id, day, total) \
                      SELECT $1, $2, $3 WHERE TRUE{after} \
                      ON CONFLICT (account_id, day) DO UPDATE \
                      SET total = daily_withdrawals.total + excluded.total",
                args: vec![
                    Arg::from(account.as_str()),
                    Arg::from(day),
                    Arg::from(*amount),
                ],
                required: true,
                yields: None,
            },
        ],
    }
}

/// `$1..$17` the row, `$18..$20` the identity.
const INSERT_JOURNAL: &str = "INSERT INTO journal (id, digest, mti, kind, amount, currency, \
     response_code, rrn, auth_code, ledger_balance, available_balance, account_id, card_id, \
     business_day, reversed, upstream_ref, created_at, terminal_id, stan, transmission) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20 WHERE TRUE{after} ON CONFLICT (terminal_id, stan, transmission) DO NOTHING";

/// [`INSERT_JOURNAL`] for a forced post: the balances (`$10`, `$11` there) are the one its
/// debit left (`{yielded}`), so the later arguments move down by two.
const INSERT_FORCED_JOURNAL: &str = "INSERT INTO journal (id, digest, mti, kind, amount, \
     currency, response_code, rrn, auth_code, ledger_balance, available_balance, account_id, \
     card_id, business_day, reversed, upstream_ref, created_at, terminal_id, stan, transmission) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, {yielded}, {yielded}, $10, $11, $12, $13, $14, \
     $15, $16, $17, $18 WHERE TRUE{after} ON CONFLICT (terminal_id, stan, transmission) DO NOTHING";

/// Fills in the row a reversal placed for this identity (`$1`, an empty digest) before the
/// request arrived; the identity (`$18..$20`) is the row's already.
const ADOPT_PLACEHOLDER: &str = "UPDATE journal SET digest = $2, mti = $3, kind = $4, \
     amount = $5, currency = $6, response_code = $7, rrn = $8, auth_code = $9, \
     ledger_balance = $10, available_balance = $11, account_id = $12, card_id = $13, \
     business_day = $14, reversed = $15, upstream_ref = $16, created_at = $17 \
     WHERE id = $1 AND digest = '' AND terminal_id = $18 AND stan = $19 \
     AND transmission = $20{after}";

/// A stand-in advice queued with its approval.
const INSERT_ADVICE: &str = "INSERT INTO saf_messages (destination, priority, mti, \
     idempotency_key, payload, reference, next_attempt_at, created_at) \
     SELECT $1, $2, $3, $4, $5{jsonb}, $6, $7, $7 WHERE TRUE{after} \
     ON CONFLICT (idempotency_key) DO NOTHING";

pub(crate) async fn reverse(
    c: &mut impl Conn,
    req: &ReversalRequest,
) -> Result<AuthOutcome, StoreError> {
    let now = micros(req.now);
    let claim = Claim {
        identity: &req.identity,
        digest: &req.digest,
        mti: &req.mti,
        kind: JournalKind::Reversal,
        amount: None,
        currency: "",
        rrn: &req.rrn,
        account: None,
        card: None,
        reversal_of: Some(&req.original),
        upstream_ref: None,
        now,
    };
    let Some(journal_id) = claim_identity(c, &claim).await? else {
        return answer_existing(c, &req.identity, &req.digest).await;
    };
    lock_identity(c, &req.original).await?;
    let original_sql = "SELECT id, digest, kind, amount, currency, response_code, reversed, account_id, \
         business_day, upstream_ref FROM journal \
         WHERE terminal_id = $1 AND stan = $2 AND transmission = $3 AND id <> $4\
         {for_no_key_update}";
    let original_args = [
        Arg::from(req.original.terminal_id.as_str()),
        Arg::from(&req.original.stan),
        Arg::from(&req.original.transmission),
        Arg::from(&journal_id),
    ];
    // a row another reversal placed (empty digest) is no original either
    let original = c
        .query_opt(original_sql, &original_args)
        .await?
        .filter(|row| row.try_get::<String>("digest").is_ok_and(|d| !d.is_empty()));
    let original = match original {
        Some(row) => row,
        None => {
            // No original (yet): place its row, reversed, so that it can never be debited —
            // an authorization of it in flight now fails to insert its own row and decides
            // again on this one (answering `21`). If the original's row appeared meanwhile
            // (it committed after this transaction's last read), reverse it after all.
            let placed = if c
                .query_opt(
                    "SELECT id FROM journal WHERE terminal_id = $1 AND stan = $2 \
                     AND transmission = $3 AND digest = ''",
                    &original_args[..3],
                )
                .await?
                .is_some()
            {
                1 // placed by an earlier reversal: still no original
            } else {
                c.execute(
                    "INSERT INTO journal (id, terminal_id, stan, transmission, digest, mti, \
                     kind, currency, response_code, rrn, created_at, reversed) \
                     VALUES ($1, $2, $3, $4, '', '0200', 'withdrawal', '', '21', '', $5, TRUE) \
                     ON CONFLICT (terminal_id, stan, transmission) DO NOTHING",
                    &[
                        Arg::from(uuid::Uuid::new_v4().to_string().as_str()),
                        Arg::from(req.original.terminal_id.as_str()),
                        Arg::from(&req.original.stan),
                        Arg::from(&req.original.transmission),
                        Arg::from(now),
                    ],
                )
                .await?
            };
            let arrived = if placed == 1 {
                None
            } else {
                c.query_opt(original_sql, &original_args).await?
            };
            match arrived {
                Some(row) => row,
                None => {
                    let entry = finish_journal(
                        c,
                        &journal_id,
                        ResponseCode::NoActionTaken,
                        &Answer::default(),
                    )
                    .await?;
                    return Ok(AuthOutcome::Done(entry));
                }
            }
        }
    };
    let original_id: String = original.try_get("id")?;
    let kind: String = original.try_get("kind")?;
    let kind = JournalKind::parse(&kind)
        .ok_or_else(|| StoreError::corrupt(format!("journal.kind {kind:?}")))?;
    let amount: Option<i64> = original.try_get("amount")?;
    let currency: String = original.try_get("currency")?;
    let response_code: String = original.try_get("response_code")?;
    let reversed: bool = original.try_get("reversed")?;
    let account_id: Option<String> = original.try_get("account_id")?;
    let business_day: Option<String> = original.try_get("business_day")?;
    let upstream_ref: Option<String> = original.try_get("upstream_ref")?;
    let mut forwarded = None;

    let (code, ledger) = match reversal_plan(kind, &response_code, reversed, amount) {
        ReversalPlan::Refuse => (ResponseCode::InvalidTransaction, None),
        ReversalPlan::NothingToRestore => (ResponseCode::Approved, None),
        ReversalPlan::Restore(_) if account_id.is_none() && upstream_ref.is_some() => {
            // routed: the issuer holds the money; the caller forwards the reversal
            c.execute(MARK_REVERSED, &[Arg::from(&original_id)]).await?;
            forwarded = upstream_ref.as_deref();
            (ResponseCode::Approved, None)
        }
        ReversalPlan::Restore(amount) => {
            let account_id = account_id
                .ok_or_else(|| StoreError::corrupt("journal.account_id of a withdrawal"))?;
            // a stand-in approval: the issuer booked (or will book) its advice too
            forwarded = upstream_ref.as_deref();
            let new_balance: i64 = c
                .scalar(
                    "UPDATE accounts SET balance = balance + $2 WHERE id = $1 RETURNING balance",
                    &[Arg::from(&account_id), Arg::from(amount)],
                )
                .await?;
            c.execute(
                "UPDATE daily_withdrawals SET total = CASE WHEN total > $3 THEN total - $3 \
                 ELSE 0 END WHERE account_id = $1 AND day = $2",
                &[
                    Arg::from(&account_id),
                    Arg::from(business_day.as_deref()),
                    Arg::from(amount),
                ],
            )
            .await?;
            c.execute(MARK_REVERSED, &[Arg::from(&original_id)]).await?;
            (ResponseCode::Approved, Some(new_balance))
        }
    };
    let entry = finish_journal(
        c,
        &journal_id,
        code,
        &Answer {
            ledger,
            available: ledger,
            amount,
            currency: Some(&currency),
            original_id: Some(&original_id),
            upstream_ref: forwarded,
            ..Answer::default()
        },
    )
    .await?;
    Ok(AuthOutcome::Done(entry))
}
