//! `GET /sessions`: the caller's sessions (every session with `sessions:read_any`), filtered and
//! paginated, computed from the provider's listing of this deployment's session machines. No
//! database: a page's cursor carries the position (creation time and machine handle of the
//! last item), and every filter, the owner's above all, applies again on every page, so a
//! forged cursor only moves the position within what the caller may see.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use providers::{MachineProvider, MachineStatus, ProviderError, StartType};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{SessionError, SessionView, Sessions};
use crate::auth::Caller;

/// Items per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 50;
/// The largest `limit`.
pub const MAX_LIMIT: u32 = 200;
/// How long one provider listing answers every `GET /sessions` of this replica: Fly allows
/// one list call a second per app (shared with the reaper, capacity and the reserves).
const LISTING_TTL: Duration = Duration::from_secs(1);
/// Longest cursor accepted (a handle is at most a few hundred characters).
const MAX_CURSOR_LEN: usize = 2048;
const CURSOR_VERSION: &str = "v1";

/// `GET /sessions` query parameters, as sent. Unknown parameters are refused.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `active` (starting or ready) or `ended` (ended or failed).
    #[param(example = "active")]
    pub status: Option<String>,
    /// Only sessions of this agent.
    pub agent: Option<String>,
    /// `hot`, `suspended`, `stopped` or `cold`.
    #[param(example = "cold")]
    pub start_type: Option<String>,
    /// Only sessions whose `createdAt` is at or after this time (RFC 3339; in a query string
    /// write `Z` or `%2B01:00`, since a bare `+` reads as a space).
    #[param(example = "2025-01-01T00:00:00Z")]
    pub since: Option<String>,
    /// Only sessions whose `createdAt` is before this time (RFC 3339).
    pub until: Option<String>,
    /// Items per page: 1 to 200, default 50.
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of `GET /sessions`, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionList {
    /// Each as `GET /sessions/{id}` shows it.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Which sessions by their status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFilter {
    /// `starting` or `ready`.
    Active,
    /// `ended` or `failed`.
    Ended,
}

/// Where a page starts: after this item, in the listing's order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    /// Creation time in unix milliseconds; `i64::MIN` for a machine without one.
    created_ms: i64,
    handle: String,
}

impl Position {
    fn of(m: &MachineStatus) -> Self {
        Self {
            created_ms: m.created_at.map_or(i64::MIN, |t| t.timestamp_millis()),
            handle: m.handle.clone(),
        }
    }

    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{CURSOR_VERSION}:{}:{}",
            self.created_ms, self.handle
        ))
    }

    fn decode(cursor: &str) -> Option<Self> {
        if cursor.len() > MAX_CURSOR_LEN {
            return None;
        }
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
        let rest = text.strip_prefix(CURSOR_VERSION)?.strip_prefix(':')?;
        let (created, handle) = rest.split_once(':')?;
        Some(Self {
            created_ms: created.parse().ok()?,
            handle: handle.to_owned(),
        })
    }
}

/// A validated query.
#[derive(Debug, Clone)]
struct ListQuery {
    status: Option<StatusFilter>,
    agent: Option<String>,
    start_type: Option<StartType>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: usize,
    after: Option<Position>,
}

impl TryFrom<ListParams> for ListQuery {
    type Error = SessionError;

    fn try_from(p: ListParams) -> Result<Self, SessionError> {
        let invalid = |m: String| SessionError::Invalid(m);
        let time = |name: &str, value: Option<String>| {
            value
                .map(|v| {
                    DateTime::parse_from_rfc3339(&v)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| {
                            invalid(format!("{name} must be an RFC 3339 time ({e}): {v:?}"))
                        })
                })
                .transpose()
        };
        Ok(Self {
            status: match p.status.as_deref() {
                None => None,
                Some("active") => Some(StatusFilter::Active),
                Some("ended") => Some(StatusFilter::Ended),
                Some(other) => {
                    return Err(invalid(format!(
                        "status must be active or ended, not {other:?}"
                    )))
                }
            },
            agent: p.agent,
            start_type: match p.start_type.as_deref() {
                None => None,
                Some("cold") => Some(StartType::Cold),
                Some(other) => match providers::Tier::parse(other) {
                    Some(tier) => Some(StartType::Warm(tier)),
                    None => {
                        return Err(invalid(format!(
                            "startType must be hot, suspended, stopped or cold, not {other:?}"
                        )))
                    }
                },
            },
            since: time("since", p.since)?,
            until: time("until", p.until)?,
            limit: match p.limit.unwrap_or(DEFAULT_LIMIT) {
                n @ 1..=MAX_LIMIT => n as usize,
                n => return Err(invalid(format!("limit must be 1 to {MAX_LIMIT}, not {n}"))),
            },
            after: p
                .cursor
                .map(|c| {
                    Position::decode(&c).ok_or_else(|| {
                        invalid(
                            "cursor is not one this API gave out (pass nextCursor as it is)".into(),
                        )
                    })
                })
                .transpose()?,
        })
    }
}

impl ListQuery {
    /// Whether `m` is one of the sessions the query asks for (the caller's right aside).
    fn wants(&self, m: &MachineStatus) -> bool {
        let Some(labels) = &m.labels else {
            return false;
        };
        let over = m.state.is_terminal() || m.failure.is_some();
        let created = m.created_at;
        self.status
            .is_none_or(|s| (s == StatusFilter::Ended) == over)
            && self.agent.as_ref().is_none_or(|a| *a == labels.agent)
            && self.start_type.is_none_or(|t| t == labels.start)
            && self
                .since
                .is_none_or(|since| created.is_some_and(|c| c >= since))
            && self
                .until
                .is_none_or(|until| created.is_some_and(|c| c < until))
            && self
                .after
                .as_ref()
                .is_none_or(|after| Position::of(m) < *after)
    }
}

/// The provider's listing, shared by this replica's `GET /sessions` for [`LISTING_TTL`]; one
/// listing at a time.
#[derive(Default)]
pub(super) struct Listing {
    last: Mutex<Option<(Instant, Arc<Vec<MachineStatus>>)>>,
}

impl Listing {
    async fn get(
        &self,
        provider: &dyn MachineProvider,
    ) -> Result<Arc<Vec<MachineStatus>>, ProviderError> {
        let mut last = self.last.lock().await;
        if let Some((at, machines)) = last.as_ref() {
            if at.elapsed() < LISTING_TTL {
                return Ok(Arc::clone(machines));
            }
        }
        let machines = Arc::new(provider.list_managed().await?);
        *last = Some((Instant::now(), Arc::clone(&machines)));
        Ok(machines)
    }
}

impl Sessions {
    /// One page of the sessions `caller` may read (its own; all with `sessions:read_any`),
    /// newest first. Invalid parameters are [`SessionError::Invalid`].
    pub async fn list(
        &self,
        caller: &Caller,
        params: ListParams,
    ) -> Result<SessionList, SessionError> {
        let query = ListQuery::try_from(params)?;
        let machines =
            self.listing.get(self.provider.as_ref()).await.inspect_err(
                |e| tracing::warn!(error = %e, "cannot list the sessions' machines"),
            )?;
        let any = caller.may_read_any();
        let mut page: Vec<&MachineStatus> = machines
            .iter()
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| any || l.owner == caller.sub)
            })
            .filter(|m| query.wants(m))
            .collect();
        page.sort_by_cached_key(|m| std::cmp::Reverse(Position::of(m)));
        let more = page.len() > query.limit;
        page.truncate(query.limit);
        let next_cursor = more
            .then(|| page.last().map(|m| Position::of(m).encode()))
            .flatten();
        let provider = self.provider.name();
        let sessions = page
            .into_iter()
            .filter_map(|m| {
                let labels = m.labels.as_ref()?;
                let id = self
                    .ids
                    .encode(&labels.session_key, &m.handle, &labels.owner);
                Some(SessionView::new(&id, provider, &m.handle, Some(m.clone())))
            })
            .collect();
        Ok(SessionList {
            sessions,
            next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for handle in [
            "148ed193b95089",
            "arn:aws:ecs:eu-west-1:1:task/c/abc",
            "a:b:c",
            "",
        ] {
            let p = Position {
                created_ms: 1_750_000_000_123,
                handle: handle.to_owned(),
            };
            assert_eq!(Position::decode(&p.encode()), Some(p));
        }
        let min = Position {
            created_ms: i64::MIN,
            handle: "x".into(),
        };
        assert_eq!(Position::decode(&min.encode()), Some(min));
        for bad in [
            "",
            "!!",
            &URL_SAFE_NO_PAD.encode("v2:1:x"),
            &URL_SAFE_NO_PAD.encode("v1:x:y"),
            &URL_SAFE_NO_PAD.encode("v1:1"),
            &"A".repeat(MAX_CURSOR_LEN + 1),
        ] {
            assert_eq!(Position::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn parameters_are_validated() {
        let parse = |p: ListParams| ListQuery::try_from(p).map(|q| q.limit);
        assert_eq!(parse(ListParams::default()).unwrap(), 50);
        for bad in [
            ListParams {
                limit: Some(0),
                ..Default::default()
            },
            ListParams {
                limit: Some(201),
                ..Default::default()
            },
            ListParams {
                status: Some("running".into()),
                ..Default::default()
            },
            ListParams {
                start_type: Some("warm".into()),
                ..Default::default()
            },
            ListParams {
                since: Some("yesterday".into()),
                ..Default::default()
            },
            ListParams {
                cursor: Some("nope".into()),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(parse(bad), Err(SessionError::Invalid(_))),
                "accepted"
            );
        }
        let q = ListQuery::try_from(ListParams {
            start_type: Some("suspended".into()),
            since: Some("2025-01-01T00:00:00Z".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            q.start_type,
            Some(StartType::Warm(providers::Tier::Suspended))
        );
        assert!(q.since.is_some());
    }
}
