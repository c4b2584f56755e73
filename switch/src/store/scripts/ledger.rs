//! Accounts, cards, PIN tries, and the two money scripts: authorize and reverse.
//!
//! Locks (PostgreSQL; SQLite's single writer makes them unnecessary there): the request
//! identity first (an advisory lock shared by a request and its reversals), then the original
//! journal row of a reversal, then the account row before its balance is read.

use chrono::{DateTime, Utc};

use super::super::sql::{Arg, Conn};
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

pub(crate) async fn authorize(
    c: &mut impl Conn,
    req: &AuthRequest,
) -> Result<AuthOutcome, StoreError> {
    validate_auth_request(req)?;
    let now = micros(req.now);
    let (kind, amount) = match req.kind {
        AuthKind::Balance => (JournalKind::Balance, None),
        AuthKind::Withdrawal { amount } => (JournalKind::Withdrawal, Some(amount)),
    };
    lock_identity(c, &req.identity).await?;
    let claim = Claim {
        identity: &req.identity,
        digest: &req.digest,
        mti: &req.mti,
        kind,
        amount,
        currency: &req.currency,
        rrn: &req.rrn,
        account: req.account_id.as_ref(),
        card: req.card_id.as_ref(),
        reversal_of: None,
        upstream_ref: req.upstream_ref.as_deref(),
        now,
    };
    let Some(journal_id) = claim_identity(c, &claim).await? else {
        // a duplicate: the original counted its PIN try, this one gives its own back
        if let Some(pin) = &req.pin_try {
            c.execute(RELEASE_PIN_TRY, &[Arg::from(pin.card_id.as_str())])
                .await?;
        }
        return answer_existing(c, &req.identity, &req.digest).await;
    };

    // the PIN count and the journal row that explains it commit together
    let pin_code = match &req.pin_try {
        Some(pin) => settle_pin_try(c, pin).await?,
        None => None,
    };
    if let Some(code) = pin_code.or(req.decline) {
        let entry = finish_journal(c, &journal_id, code, &Answer::default()).await?;
        return Ok(AuthOutcome::Done(entry));
    }

    // the terminal gave up on this request and reversed it before it reached us (or while
    // it was in flight): apply nothing, so the reversal and the request net to zero
    let reversed_before: Option<String> = c
        .scalar_opt(
            "SELECT id FROM journal WHERE kind = 'reversal' AND orig_terminal_id = $1 \
             AND orig_stan = $2 AND orig_transmission = $3 LIMIT 1",
            &[
                Arg::from(req.identity.terminal_id.as_str()),
                Arg::from(&req.identity.stan),
                Arg::from(&req.identity.transmission),
            ],
        )
        .await?;
    if reversed_before.is_some() {
        c.execute(MARK_REVERSED, &[Arg::from(&journal_id)]).await?;
        let entry = finish_journal(
            c,
            &journal_id,
            ResponseCode::NoActionTaken,
            &Answer::default(),
        )
        .await?;
        return Ok(AuthOutcome::Done(entry));
    }

    if let Some(issuer) = &req.issuer_answer {
        let (code, answer) = issuer_journal_answer(issuer);
        let entry = finish_journal(c, &journal_id, code, &answer).await?;
        return Ok(AuthOutcome::Done(entry));
    }

    let account_id = req
        .account_id
        .as_ref()
        .ok_or_else(|| StoreError::invalid("accountId: required to authorize"))?;
    // the account row lock serializes every balance decision on this account
    let account = c
        .query_opt(
            "SELECT currency, balance, daily_withdrawal_limit FROM accounts WHERE id = $1\
             {for_no_key_update}",
            &[Arg::from(account_id.as_str())],
        )
        .await?
        .ok_or_else(|| StoreError::not_found(format!("account {account_id}")))?;
    let currency: String = account.try_get("currency")?;
    let balance: i64 = account.try_get("balance")?;
    let limit: i64 = account.try_get("daily_withdrawal_limit")?;

    let (code, ledger, day) = if currency != req.currency {
        // no currency conversion in the switch: refuse rather than debit the wrong amount
        (ResponseCode::InvalidTransaction, None, None)
    } else {
        match req.kind {
            AuthKind::Balance => (ResponseCode::Approved, Some(balance), None),
            AuthKind::Withdrawal { amount } => {
                let day = utc_day(now);
                if let Some(ceiling) = req.force_post_ceiling.filter(|_| req.force_post)
                    && amount > 0
                {
                    claim_station_advice(c, &req.identity.terminal_id, &day, amount, &ceiling)
                        .await?;
                }
                // read after the account lock: a fresh snapshot sees every committed debit
                let withdrawn: i64 = c
                    .scalar(
                        "SELECT COALESCE((SELECT total FROM daily_withdrawals \
                         WHERE account_id = $1 AND day = $2), 0)",
                        &[Arg::from(account_id.as_str()), Arg::from(&day)],
                    )
                    .await?;
                match withdrawal_decision(amount, balance, withdrawn, limit, req.force_post) {
                    ResponseCode::Approved => {
                        // a forced post may overdraw; anything else never does
                        let new_balance: Option<i64> = c
                            .scalar_opt(
                                "UPDATE accounts SET balance = balance - $2 \
                                 WHERE id = $1 AND ($3 OR balance >= $2) RETURNING balance",
                                &[
                                    Arg::from(account_id.as_str()),
                                    Arg::from(amount),
                                    Arg::from(req.force_post),
                                ],
                            )
                            .await?;
                        match new_balance {
                            Some(b) => {
                                c.execute(
                                    "INSERT INTO daily_withdrawals (account_id, day, total) \
                                     VALUES ($1, $2, $3) ON CONFLICT (account_id, day) \
                                     DO UPDATE SET total = daily_withdrawals.total + excluded.total",
                                    &[
                                        Arg::from(account_id.as_str()),
                                        Arg::from(&day),
                                        Arg::from(amount),
                                    ],
                                )
                                .await?;
                                (ResponseCode::Approved, Some(b), Some(day))
                            }
                            // the lock makes this unreachable; refuse rather than overdraw
                            None => (ResponseCode::InsufficientFunds, None, None),
                        }
                    }
                    other => (other, None, None),
                }
            }
        }
    };
    let auth_code = (code == ResponseCode::Approved).then_some(req.auth_code.as_str());
    let entry = finish_journal(
        c,
        &journal_id,
        code,
        &Answer {
            auth_code,
            ledger,
            available: ledger,
            business_day: day.as_deref(),
            ..Answer::default()
        },
    )
    .await?;
    if let Some(advice) = req.advice.as_ref().filter(|_| entry.approved()) {
        let advice = NewAdvice {
            reference: advice
                .reference
                .clone()
                .or_else(|| Some(journal_id.clone())),
            ..advice.clone()
        };
        insert_advice(c, &advice).await?;
    }
    Ok(AuthOutcome::Done(entry))
}

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
    let original = c
        .query_opt(
            "SELECT id, kind, amount, currency, response_code, reversed, account_id, \
             business_day, upstream_ref FROM journal \
             WHERE terminal_id = $1 AND stan = $2 AND transmission = $3 AND id <> $4\
             {for_no_key_update}",
            &[
                Arg::from(req.original.terminal_id.as_str()),
                Arg::from(&req.original.stan),
                Arg::from(&req.original.transmission),
                Arg::from(&journal_id),
            ],
        )
        .await?;
    let Some(original) = original else {
        let entry = finish_journal(
            c,
            &journal_id,
            ResponseCode::NoActionTaken,
            &Answer::default(),
        )
        .await?;
        return Ok(AuthOutcome::Done(entry));
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
