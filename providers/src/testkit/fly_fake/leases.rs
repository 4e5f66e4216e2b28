//! Machine leases: `POST/GET/DELETE /apps/{app}/machines/{id}/lease`, and the guard every
//! mutating call on a machine passes (while a lease holds, only its nonce may write).
//!
//! Where the spec is silent (it documents only the success statuses), the fake answers as Fly
//! does in practice: a write to a machine leased by someone else, or a second acquire, is 409
//! `{"error": "aborted: machine ID … lease currently held by …, expires at …"}`; showing or
//! releasing a lease that does not exist is 404 `{"error": "lease not found"}`.

use chrono::Utc;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::super::random_string;
use super::super::server::Reply;
use super::machines::Answer;
use super::state::{fly_error, not_found, rfc3339, FlyState, LeaseRecord, MachineRecord, Shared};
use super::{FakeFlyWarmConfig, FakeLease, ViolationKind};

/// The request header that carries a lease's nonce.
pub(super) const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// TTL of a lease whose request gives none (an assumption: Fly does not document its default).
const DEFAULT_TTL_SECS: i64 = 30;

/// Who holds the fake's leases: every client shares the one API token, as botdispatch's
/// replicas do (Fly names the token's owner, `<id>@tokens.fly.io`).
const OWNER: &str = "botdispatch-test@tokens.fly.io";

/// A new lease on `record` for `ttl_secs` seconds.
pub(super) fn new_lease(
    record: &MachineRecord,
    ttl_secs: i64,
    description: &str,
    warm: &FakeFlyWarmConfig,
) -> LeaseRecord {
    let mut lease = LeaseRecord {
        lease: FakeLease {
            nonce: random_string(super::super::LOWER_HEX, 12),
            owner: OWNER.to_owned(),
            description: description.to_owned(),
            version: record.machine.instance_id.clone(),
            expires_at: Utc::now(),
        },
        deadline: Instant::now(),
    };
    extend(&mut lease, ttl_secs, warm);
    lease
}

/// The lease now lasts `ttl_secs` (nominal) seconds more.
fn extend(lease: &mut LeaseRecord, ttl_secs: i64, warm: &FakeFlyWarmConfig) {
    let secs = u32::try_from(ttl_secs.max(1)).unwrap_or(u32::MAX);
    lease.deadline = Instant::now() + warm.lease_second.saturating_mul(secs);
    lease.lease.expires_at = Utc::now() + chrono::Duration::seconds(i64::from(secs));
}

/// The answer of a lease endpoint: the spec's `Lease` fields, and the same again in the
/// `{"status": "success", "data": {…}}` envelope real Fly answers (fly-go's `MachineLease`).
/// Clients written against Fly should read `data`.
fn lease_json(lease: &FakeLease) -> Value {
    let data = json!({
        "nonce": lease.nonce,
        "expires_at": lease.expires_at.timestamp(),
        "owner": lease.owner,
        "description": lease.description,
        "version": lease.version,
    });
    let mut out = data.clone();
    out["status"] = json!("success");
    out["data"] = data;
    out
}

/// Fly's refusal of a write to (or acquire of) a machine leased by someone else.
fn conflict(id: &str, lease: &FakeLease) -> Reply {
    fly_error(
        409,
        format!(
            "aborted: machine ID {id} lease currently held by {}, expires at {}",
            lease.owner,
            rfc3339(lease.expires_at)
        ),
    )
}

/// Lets a mutating call (`what`) on machine `state.machines[i]` through if no lease holds or
/// `nonce` is the lease's; otherwise records a [`ViolationKind::WriteWithoutLeaseNonce`] and
/// answers 409. The spec is silent on this status: 409 is an assumption, matching the
/// `aborted: … lease currently held by …` answers seen from Fly.
pub(super) fn guard(
    state: &mut FlyState,
    i: usize,
    nonce: Option<&str>,
    what: &str,
) -> Result<(), Reply> {
    let record = &state.machines[i];
    let Some(lease) = record.active_lease() else {
        return Ok(());
    };
    if nonce == Some(lease.lease.nonce.as_str()) {
        return Ok(());
    }
    let id = record.machine.id.clone();
    let reply = conflict(&id, &lease.lease);
    let detail = match nonce {
        Some(_) => format!("{what} with a wrong lease nonce"),
        None => format!("{what} without the lease nonce"),
    };
    state.violation(&id, ViolationKind::WriteWithoutLeaseNonce, detail);
    Err(reply)
}

/// The index of machine `id` of `app` for a mutating call: 404 if unknown or destroyed, 409 if
/// leased by someone else (see [`guard`]).
pub(super) fn writable(
    state: &mut FlyState,
    app: &str,
    id: &str,
    nonce: Option<&str>,
    what: &str,
) -> Result<usize, Reply> {
    let i = live(state, app, id)?;
    guard(state, i, nonce, what)?;
    Ok(i)
}

/// The index of machine `id` of `app` unless unknown or destroyed (404).
fn live(state: &FlyState, app: &str, id: &str) -> Result<usize, Reply> {
    state
        .index(app, id)
        .filter(|i| state.machines[*i].machine.state != "destroyed")
        .ok_or_else(not_found)
}

fn lease_not_found() -> Reply {
    fly_error(404, "lease not found")
}

impl Shared {
    /// `GET /apps/{app}/machines/{id}/lease`: 200 with the lease, 404 when none holds.
    pub(super) fn show_lease(&self, app: &str, id: &str) -> Answer {
        let state = self.lock();
        let i = live(&state, app, id)?;
        let lease = state.machines[i]
            .active_lease()
            .ok_or_else(lease_not_found)?;
        Ok(Reply::json(200, lease_json(&lease.lease)))
    }

    /// `POST /apps/{app}/machines/{id}/lease` (`CreateLeaseRequest {ttl, description}`): 201
    /// with a new lease; with the holder's nonce in `fly-machine-lease-nonce`, 201 with the same
    /// lease refreshed to `ttl`; 409 while someone else's lease holds. A nonce that matches no
    /// holding lease (e.g. an expired one) gets a new lease.
    pub(super) fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        body: Option<&Value>,
        nonce: Option<&str>,
    ) -> Answer {
        let ttl = body
            .and_then(|b| b.get("ttl"))
            .and_then(Value::as_i64)
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_TTL_SECS);
        let description = body
            .and_then(|b| b.get("description"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let mut state = self.lock();
        let i = live(&state, app, id)?;
        let record = &mut state.machines[i];
        if let Some(held) = record.active_lease() {
            if nonce != Some(held.lease.nonce.as_str()) {
                return Err(conflict(id, &held.lease));
            }
            let version = record.machine.instance_id.clone();
            let lease = record.lease.as_mut().expect("an active lease exists");
            extend(lease, ttl, &self.warm);
            lease.lease.version = version;
            if !description.is_empty() {
                lease.lease.description = description.to_owned();
            }
            return Ok(Reply::json(201, lease_json(&lease.lease)));
        }
        let lease = new_lease(record, ttl, description, &self.warm);
        let answer = lease_json(&lease.lease);
        record.lease = Some(lease);
        Ok(Reply::json(201, answer))
    }

    /// `DELETE /apps/{app}/machines/{id}/lease` with the holder's nonce: 200, the lease is
    /// gone. 404 when no lease holds; 409 (and a violation) with another nonce.
    pub(super) fn release_lease(&self, app: &str, id: &str, nonce: Option<&str>) -> Answer {
        let mut state = self.lock();
        let i = live(&state, app, id)?;
        if state.machines[i].active_lease().is_none() {
            return Err(lease_not_found());
        }
        guard(&mut state, i, nonce, "lease release")?;
        state.machines[i].lease = None;
        Ok(Reply::json(200, json!({"ok": true})))
    }
}
