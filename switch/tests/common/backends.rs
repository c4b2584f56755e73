//! The two stores every story runs against, shared by the store-story suites: a fresh SQLite
//! file, and PostgreSQL (when `SWITCHYARD_TEST_DATABASE_URL` is set; required when `CI=true`)
//! in a freshly created schema, so the tests run in parallel. `stories!` runs each story on both.

use std::time::Duration;

use switchyard_switch::store::*;

pub(crate) const PG_ENV: &str = "SWITCHYARD_TEST_DATABASE_URL";

/// What has to be cleaned up after a story.
pub(crate) enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin: sqlx::PgPool, schema: String },
}

impl Guard {
    pub(crate) async fn cleanup(self) {
        if let Guard::Postgres { admin, schema } = self {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

pub(crate) fn opts() -> ConnectOptions {
    ConnectOptions {
        max_connections: 8,
        acquire_timeout: Duration::from_secs(30),
    }
}

pub(crate) async fn open_sqlite(migrate: bool) -> (Store, Guard) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = connect(&url, &opts()).await.expect("open sqlite store");
    if migrate {
        store.migrate().await.expect("migrate sqlite");
    }
    (store, Guard::Sqlite(dir))
}

/// The PostgreSQL URL under test, or `None` (with a notice) when it is not configured.
pub(crate) fn postgres_url() -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{PG_ENV} must be set when CI=true");
            }
            eprintln!("skipping PostgreSQL story: {PG_ENV} is not set");
            None
        }
    }
}

pub(crate) async fn open_postgres(migrate: bool) -> Option<(Store, Guard)> {
    let url = postgres_url()?;
    let admin = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to the test PostgreSQL");
    let schema = format!("story_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create test schema");
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    let store = connect(&scoped, &opts())
        .await
        .expect("open postgres store");
    if migrate {
        store.migrate().await.expect("migrate postgres");
    }
    Some((store, Guard::Postgres { admin, schema }))
}

/// Runs every story against both backends: `sqlite::<story>` and `postgres::<story>`.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    let (store, guard) = super::open_sqlite(true).await;
                    assert_eq!(store.backend(), super::Backend::Sqlite);
                    super::$story(store).await;
                    guard.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    let Some((store, guard)) = super::open_postgres(true).await else { return };
                    assert_eq!(store.backend(), super::Backend::Postgres);
                    super::$story(store).await;
                    guard.cleanup().await;
                }
            )*
        }
    };
}
pub(crate) use stories;
