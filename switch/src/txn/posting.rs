//! What a financial request or advice posts: one typed value, decided before the store is
//! called, instead of optional fields checked at run time.
//!
//! The store still takes its [`AuthRequest`]; [`auth_request`] is the one place that turns a
//! [`Posting`] into it (until the store takes the enum itself).

use chrono::{DateTime, Utc};

use crate::domain::ResponseCode;
use crate::store::{
    AccountId, AuthKind, AuthRequest, AuthView, CardId, ForcePostCeiling, IssuerAnswer, NewAdvice,
    PinTry, RequestIdentity,
};

/// What every posting journals: the request and the references the switch assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Journaled {
    /// Duplicate-detection identity.
    pub identity: RequestIdentity,
    /// Digest of the request's content.
    pub digest: String,
    /// Request MTI.
    pub mti: String,
    /// Balance inquiry or withdrawal.
    pub kind: AuthKind,
    /// Field 49.
    pub currency: String,
    /// Field 37 (assigned, or an acquirer's kept).
    pub rrn: String,
    /// Field 38 to give if approved.
    pub auth_code: String,
    /// Business time.
    pub now: DateTime<Utc>,
}

/// The card a request acts on, and its account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRef {
    /// The card.
    pub card_id: CardId,
    /// Its account.
    pub account_id: AccountId,
}

/// An approval given on behalf of an unavailable issuer (SPEC §6).
#[derive(Debug, Clone, PartialEq)]
pub struct StandIn {
    /// The 0220 queued for the issuer in the same transaction, iff approved.
    pub advice: NewAdvice,
    /// How the issuer will know it.
    pub upstream_ref: String,
}

/// What is posted.
#[derive(Debug, Clone, PartialEq)]
pub enum Posting {
    /// Declined before the ledger (card, PIN, route, issuer unavailable…): journal the code,
    /// touch no account. A wrong PIN settles its reserved try (`pin_try`).
    Decline {
        /// Field 39 (`55`, which the store turns into `75` on the third wrong PIN in a row).
        code: ResponseCode,
        /// The card, when it was found.
        card: Option<CardRef>,
        /// The PIN try reserved and checked, if any.
        pin_try: Option<PinTry>,
    },
    /// Authorize against the local ledger (on-us, or stand-in for an issuer).
    Ledger {
        /// Card and account.
        card: CardRef,
        /// The (correct) PIN try to settle.
        pin_try: Option<PinTry>,
        /// Set when approving on an issuer's behalf.
        stand_in: Option<StandIn>,
    },
    /// Routed: journal the issuer's answer, touch no account.
    IssuerAnswer {
        /// What the issuer said.
        answer: IssuerAnswer,
        /// How the issuer knows the request we sent.
        upstream_ref: Option<String>,
    },
    /// An acquirer station's advice: booked without balance and limit checks, within the
    /// station's ceilings.
    ForcedAdvice {
        /// Card and account.
        card: CardRef,
        /// The station's ceilings.
        ceiling: ForcePostCeiling,
    },
}

impl Posting {
    /// A decline with nothing else known.
    pub fn decline(code: ResponseCode) -> Self {
        Posting::Decline {
            code,
            card: None,
            pin_try: None,
        }
    }

    /// The PIN try this posting settles (to give back if it is never posted).
    pub fn pin_try(&self) -> Option<&PinTry> {
        match self {
            Posting::Decline { pin_try, .. } | Posting::Ledger { pin_try, .. } => pin_try.as_ref(),
            Posting::IssuerAnswer { .. } | Posting::ForcedAdvice { .. } => None,
        }
    }

    /// Whether this is an approval on an issuer's behalf.
    pub fn is_stand_in(&self) -> bool {
        matches!(
            self,
            Posting::Ledger {
                stand_in: Some(_),
                ..
            }
        )
    }
}

/// The store's request for `posting`, decided on `seen` (see [`AuthRequest::seen`]): the
/// boundary between the typed pipeline and the store.
pub fn auth_request(head: Journaled, seen: Option<AuthView>, posting: Posting) -> AuthRequest {
    let mut req = AuthRequest {
        identity: head.identity,
        digest: head.digest,
        mti: head.mti,
        kind: head.kind,
        card_id: None,
        account_id: None,
        currency: head.currency,
        rrn: head.rrn,
        auth_code: head.auth_code,
        decline: None,
        now: head.now,
        advice: None,
        issuer_answer: None,
        force_post: false,
        force_post_ceiling: None,
        upstream_ref: None,
        pin_try: None,
        seen,
    };
    let on_card = |req: &mut AuthRequest, card: CardRef| {
        req.card_id = Some(card.card_id);
        req.account_id = Some(card.account_id);
    };
    match posting {
        Posting::Decline {
            code,
            card,
            pin_try,
        } => {
            req.decline = Some(code);
            if let Some(card) = card {
                on_card(&mut req, card);
            }
            req.pin_try = pin_try;
        }
        Posting::Ledger {
            card,
            pin_try,
            stand_in,
        } => {
            on_card(&mut req, card);
            req.pin_try = pin_try;
            if let Some(stand_in) = stand_in {
                req.advice = Some(stand_in.advice);
                req.upstream_ref = Some(stand_in.upstream_ref);
            }
        }
        Posting::IssuerAnswer {
            answer,
            upstream_ref,
        } => {
            req.issuer_answer = Some(answer);
            req.upstream_ref = upstream_ref;
        }
        Posting::ForcedAdvice { card, ceiling } => {
            on_card(&mut req, card);
            req.force_post = true;
            req.force_post_ceiling = Some(ceiling);
        }
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TerminalId;

    fn head() -> Journaled {
        Journaled {
            identity: RequestIdentity {
                terminal_id: TerminalId::new("ATM1").unwrap(),
                stan: "000001".into(),
                transmission: "1122153045".into(),
            },
            digest: "d".into(),
            mti: "0200".into(),
            kind: AuthKind::Withdrawal { amount: 100 },
            currency: "360".into(),
            rrn: "612345678901".into(),
            auth_code: "123456".into(),
            now: Utc::now(),
        }
    }

    fn card() -> CardRef {
        CardRef {
            card_id: CardId::new("card-1").unwrap(),
            account_id: AccountId::new("ACC-1").unwrap(),
        }
    }

    #[test]
    fn each_posting_sets_only_its_own_fields() {
        let wrong_pin = PinTry {
            card_id: card().card_id,
            correct: false,
            pvv: "00001".into(),
        };
        let r = auth_request(
            head(),
            None,
            Posting::Decline {
                code: ResponseCode::IncorrectPin,
                card: Some(card()),
                pin_try: Some(wrong_pin.clone()),
            },
        );
        assert_eq!(r.decline, Some(ResponseCode::IncorrectPin));
        assert_eq!(r.pin_try, Some(wrong_pin));
        assert!(r.account_id.is_some() && !r.force_post && r.issuer_answer.is_none());

        let r = auth_request(
            head(),
            None,
            Posting::Ledger {
                card: card(),
                pin_try: None,
                stand_in: None,
            },
        );
        assert!(r.decline.is_none() && r.advice.is_none() && r.upstream_ref.is_none());
        assert_eq!(r.account_id, Some(card().account_id));

        let r = auth_request(
            head(),
            None,
            Posting::IssuerAnswer {
                answer: IssuerAnswer {
                    response_code: ResponseCode::Approved,
                    auth_code: None,
                    ledger_balance: None,
                    available_balance: None,
                },
                upstream_ref: Some("up:0200:000001:1122153045".into()),
            },
        );
        assert!(r.issuer_answer.is_some() && r.account_id.is_none() && r.decline.is_none());
        assert_eq!(r.upstream_ref.as_deref(), Some("up:0200:000001:1122153045"));

        let ceiling = ForcePostCeiling {
            per_advice: 10,
            per_day: 20,
        };
        let r = auth_request(
            head(),
            None,
            Posting::ForcedAdvice {
                card: card(),
                ceiling,
            },
        );
        assert!(r.force_post);
        assert_eq!(r.force_post_ceiling, Some(ceiling));
    }
}
