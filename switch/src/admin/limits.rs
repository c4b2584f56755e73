//! Rate limits of the admin API (GCRA, from the `governor` crate), answered `429` with
//! `Retry-After`:
//!
//! - per client address: `rate_limit_per_second` steady, `rate_limit_burst` at once, checked
//!   before any token is looked at;
//! - per token (caller identity): the same figures, so one leaked token on many addresses is
//!   held too;
//! - failed authentications per client address: `auth_failures_per_minute`; beyond it the
//!   address gets `429` for every request, before its token is checked, until the budget
//!   refills, so guessing tokens gets nowhere.
//!
//! IPv6 addresses are limited per /64 (one host usually holds a whole /64), IPv4-mapped ones as
//! the IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use crate::settings::AdminSettings;

/// The admin API's limiters.
pub struct RateLimits {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_token: DefaultKeyedRateLimiter<String>,
    auth_failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses that spent their failed-authentication budget, until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

/// Every this many checks, state of keys not seen lately is dropped (bounded memory however
/// many addresses come by).
const PRUNE_EVERY: u64 = 4096;

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    /// Limiters with the figures of `[admin]` (zero is read as one; settings refuse it).
    pub fn new(s: &AdminSettings) -> Self {
        let steady = Quota::per_second(nonzero(s.rate_limit_per_second))
            .allow_burst(nonzero(s.rate_limit_burst));
        let failures = Quota::per_minute(nonzero(s.auth_failures_per_minute));
        Self {
            by_address: RateLimiter::keyed(steady),
            by_token: RateLimiter::keyed(steady),
            auth_failures: RateLimiter::keyed(failures),
            blocked: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Admits one request from `ip`, or says which limit refused it (`address` or
    /// `auth_failures`) and the answer.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), (&'static str, ApiError)> {
        self.prune_now_and_then();
        let ip = client_key(ip);
        let now = Instant::now();
        if let Some(until) = self.blocked().get(&ip).copied()
            && until > now
        {
            return Err((
                "auth_failures",
                ApiError::TooManyRequests {
                    scope: "from this address after failed authentications",
                    retry_after: whole_seconds(until - now),
                },
            ));
        }
        self.by_address.check_key(&ip).map_err(|not_until| {
            (
                "address",
                ApiError::TooManyRequests {
                    scope: "from this address",
                    retry_after: whole_seconds(not_until.wait_time_from(self.clock.now())),
                },
            )
        })
    }

    /// Admits one request of the caller `name`.
    pub fn check_token(&self, name: &str) -> Result<(), ApiError> {
        self.by_token
            .check_key(&name.to_string())
            .map_err(|not_until| ApiError::TooManyRequests {
                scope: "with this token",
                retry_after: whole_seconds(not_until.wait_time_from(self.clock.now())),
            })
    }

    /// Counts a failed authentication from `ip`; once its budget is spent the address is
    /// blocked until one more failure would be allowed.
    pub fn auth_failed(&self, ip: IpAddr) {
        let ip = client_key(ip);
        if let Err(not_until) = self.auth_failures.check_key(&ip) {
            let wait = not_until.wait_time_from(self.clock.now());
            self.blocked().insert(ip, Instant::now() + wait);
            tracing::warn!(%ip, ?wait, "admin API: too many failed authentications; address blocked");
        }
    }

    fn blocked(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prune_now_and_then(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY != PRUNE_EVERY - 1 {
            return;
        }
        self.by_address.retain_recent();
        self.by_token.retain_recent();
        self.auth_failures.retain_recent();
        let now = Instant::now();
        self.blocked().retain(|_, until| *until > now);
    }
}

/// The key an address is limited under: IPv4 (also IPv4-mapped) as is, IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// `Retry-After` seconds: rounded up, at least one.
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_second: u32, burst: u32, failures: u32) -> AdminSettings {
        AdminSettings {
            rate_limit_per_second: per_second,
            rate_limit_burst: burst,
            auth_failures_per_minute: failures,
            ..AdminSettings::default()
        }
    }

    #[test]
    fn a_burst_beyond_the_limit_is_refused_with_a_retry_time() {
        let limits = RateLimits::new(&settings(1, 3, 10));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.check_address(ip).is_ok());
        }
        let (limit, err) = limits.check_address(ip).unwrap_err();
        assert_eq!(limit, "address");
        assert!(
            matches!(err, ApiError::TooManyRequests { retry_after: 1, .. }),
            "{err:?}"
        );
        // another address is not affected
        assert!(limits.check_address("192.0.2.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn failed_authentications_block_the_address() {
        let limits = RateLimits::new(&settings(100, 100, 2));
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        limits.auth_failed(ip);
        limits.auth_failed(ip);
        assert!(limits.check_address(ip).is_ok());
        limits.auth_failed(ip);
        // the same /64 is the same client
        let (limit, err) = limits
            .check_address("2001:db8::2".parse().unwrap())
            .unwrap_err();
        assert_eq!(limit, "auth_failures");
        assert!(
            matches!(err, ApiError::TooManyRequests { retry_after, .. } if (1..=30).contains(&retry_after)),
            "{err:?}"
        );
    }

    #[test]
    fn tokens_have_their_own_budget() {
        let limits = RateLimits::new(&settings(1, 2, 10));
        assert!(limits.check_token("admin#1").is_ok());
        assert!(limits.check_token("admin#1").is_ok());
        assert!(limits.check_token("admin#1").is_err());
        assert!(limits.check_token("admin#2").is_ok());
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        assert_eq!(
            client_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
