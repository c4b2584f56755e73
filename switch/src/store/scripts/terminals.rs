//! Terminals and acquirer stations.

use chrono::Utc;

use super::super::sql::{Arg, Conn};
use super::super::*;
use super::common::*;
use crate::domain::TerminalId;

pub(crate) async fn create(
    c: &mut impl Conn,
    t: &NewTerminal,
    actor: &str,
) -> Result<Terminal, StoreError> {
    validate_group(&t.group)?;
    let now = micros(Utc::now());
    let done = c
        .execute(
            "INSERT INTO terminals (id, grp, kind, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING",
            &[
                Arg::from(t.id.as_str()),
                Arg::from(&t.group),
                Arg::from(t.kind.as_str()),
                Arg::from(now),
            ],
        )
        .await?;
    if done == 0 {
        return Err(StoreError::conflict(format!("terminal {}", t.id)));
    }
    let detail = serde_json::json!({"group": t.group, "kind": t.kind.as_str()});
    write_audit(
        c,
        now,
        &audit(actor, "terminal.create", t.id.as_str(), detail),
    )
    .await?;
    Ok(Terminal {
        id: t.id.clone(),
        group: t.group.clone(),
        kind: t.kind,
        created_at: now,
    })
}

pub(crate) async fn create_bulk(
    c: &mut impl Conn,
    terminals: &[NewTerminal],
    actor: &str,
) -> Result<u64, StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(terminals.len());
    for t in terminals {
        validate_group(&t.group)?;
        if !seen.insert(t.id.as_str()) {
            return Err(StoreError::invalid(format!(
                "terminal {}: listed twice",
                t.id
            )));
        }
    }
    let now = micros(Utc::now());
    let mut inserted = 0;
    for chunk in terminals.chunks(BULK_CHUNK) {
        let sql = format!(
            "INSERT INTO terminals (id, grp, kind, created_at) VALUES {} \
             ON CONFLICT (id) DO NOTHING",
            values_placeholders(chunk.len(), 4)
        );
        let mut args = Vec::with_capacity(chunk.len() * 4);
        for t in chunk {
            args.extend([
                Arg::from(t.id.as_str()),
                Arg::from(&t.group),
                Arg::from(t.kind.as_str()),
                Arg::from(now),
            ]);
        }
        let done = c.execute(&sql, &args).await?;
        if done != chunk.len() as u64 {
            return Err(StoreError::conflict(
                "terminals: at least one id is already registered",
            ));
        }
        inserted += done;
    }
    let detail = serde_json::json!({"terminals": inserted});
    write_audit(
        c,
        now,
        &audit(actor, "terminal.create-bulk", "terminals", detail),
    )
    .await?;
    Ok(inserted)
}

pub(crate) async fn get(
    c: &mut impl Conn,
    id: &TerminalId,
) -> Result<Option<Terminal>, StoreError> {
    c.query_opt(
        select!(TERMINAL_COLS, "FROM terminals WHERE id = $1"),
        &[Arg::from(id.as_str())],
    )
    .await?
    .as_ref()
    .map(terminal_from_row)
    .transpose()
}

pub(crate) async fn list(c: &mut impl Conn, page: &Page) -> Result<Vec<Terminal>, StoreError> {
    c.query(
        select!(
            TERMINAL_COLS,
            "FROM terminals WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2"
        ),
        &[
            Arg::from(page.after.as_deref()),
            Arg::from(page.effective_limit()),
        ],
    )
    .await?
    .iter()
    .map(terminal_from_row)
    .collect()
}

pub(crate) async fn selected(
    c: &mut impl Conn,
    sel: &TerminalSelector,
) -> Result<Vec<TerminalId>, StoreError> {
    let rows = match sel {
        TerminalSelector::All => {
            c.query(
                "SELECT id FROM terminals WHERE kind <> 'station' ORDER BY id",
                &[],
            )
            .await?
        }
        TerminalSelector::Ids(ids) => {
            let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_string()).collect();
            // one list parameter instead of thousands of bind variables
            c.query(
                "SELECT id FROM terminals WHERE id {in_list}$1{end_list}",
                &[Arg::List(&ids)],
            )
            .await?
        }
        TerminalSelector::Groups(groups) => {
            c.query(
                "SELECT id FROM terminals WHERE grp {in_list}$1{end_list} \
                 AND kind <> 'station'",
                &[Arg::List(groups)],
            )
            .await?
        }
    };
    let mut ids = rows
        .iter()
        .map(|r| r.first())
        .collect::<Result<Vec<String>, _>>()?;
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|id| parse_terminal_id(id, "terminals.id"))
        .collect()
}
