//! The `kubernetes` provider's warm side (DESIGN §4, §10): the `http` handoff to a pod's bot
//! server, and a hot reserve of pods claimed like Agones allocates game servers.
//!
//! **Where a bot is reached.** [`KubernetesConfig::pod_url`](super::KubernetesConfig::pod_url)
//! (default `http://{pod_ip}:{port}`). A reserve pod's IP comes with the listing the claim was
//! made from; a cold pod's `Launched` comes back from its create, before it has an IP, so
//! `wait_started` keeps the IP it saw for the handoff that follows on the same replica.
//!
//! **Ready.** A reserve pod carries a `readinessProbe` on the bot's `/readyz` (every second):
//! the kubelet marks it `Ready` once the bot can take a session. The dispatcher's replenishment
//! then probes `/readyz` itself and marks the pod (`botdispatch.io/ready=1`, one patch), which
//! proves the dispatcher can reach it (a NetworkPolicy that blocks it shows here, not on a
//! client's start). A pod is claimable while it is `Running`, `Ready`, marked, not being deleted
//! and younger than `reserve_max_idle_secs`. Cold pods get no probe: the start that waits for
//! one polls `/readyz` itself, faster than a kubelet probe period.
//!
//! **Claim.** One merge patch that moves the pod's labels from `botdispatch.io/role=reserve` to
//! `session` (with the session's labels) and names the `resourceVersion` of the listing it was
//! chosen from: the API server applies it only to that version (optimistic concurrency), so of
//! two replicas claiming one pod exactly one succeeds and the other gets 409 `Conflict`. A 409
//! can also mean that only the pod's status moved since the listing (a kubelet update): the
//! claim reads the pod once and, if it is still an unclaimed ready reserve pod, patches again
//! with the new version; a pod another replica relabelled is [`ProviderError::Conflict`] and the
//! caller tries the next. The same patch lowers `activeDeadlineSeconds` (a reserve pod is
//! created with `reserve_max_idle_secs + max_pod_secs`) to `max_pod_secs` from now, as for a
//! cold pod; the confirmed deadline lowers it further. No lease: the claim hands nothing back to
//! hold, and retiring an unclaimed pod deletes it with the `resourceVersion` it read as a
//! precondition, so a claim in between makes the delete fail instead of killing a session.
//!
//! **After the handoff.** The API has no "send SIGTERM". Deleting a pod with a grace period is
//! the one way to signal its bot: SIGTERM now, SIGKILL when the grace ends. So
//! `end_after_session` deletes the pod with a grace of `max_pod_secs`, and the relabel that
//! confirms the session's deadline right after shortens that grace to end at the deadline (a
//! second DELETE; only a shorter grace is ever taken). The bot (a Pipecat base image: on SIGTERM
//! it refuses new connections and finishes its session) ends its call, exits, and the kubelet
//! removes the pod: nothing stays behind, and no second `/bot` can reach that boot. Relying on
//! the pod spec alone (`restartPolicy: Never`, `activeDeadlineSeconds`) would not do: a base
//! image stays up after its session, accepting another `/bot` from anyone who reaches it, and
//! its pod would hold its node's CPU and memory until the session deadline. While the bot
//! finishes, the pod is `Terminating` but reported started (its container runs): status,
//! capacity and the reaper see a live session; a stop (a delete with the short stop grace) ends
//! it at once.
//!
//! **Never reused.** A pod runs once (`restartPolicy: Never`): there is no recycle, so
//! `list_reserve` returns unclaimed reserve pods only, never held ones. A claimed pod removes
//! itself after its session (above); reporting it as held would make it keep its reserve slot
//! for the whole session instead of letting the reserve refill at once. A reserve pod is named
//! after its slot and the 5-second window it was created in (so replicas filling one slot at
//! once collide on the name): a name can come back only for a pod that was created, claimed,
//! served its whole session and went within one window. A session id naming such a pod then
//! reads as not found (the new pod carries no session labels), never as another session.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use super::pod::{self, label, RESERVE_UP};
use super::{api_error, KubernetesProvider, NAME};
use crate::labels::{key, ROLE_RESERVE, ROLE_SESSION};
use crate::{
    HttpHandoff, Launched, MachineStatus, MachineTemplate, ProviderError, Reserve, ReserveLabels,
    SessionLabels, Tier,
};

/// How long a pod IP seen while waiting for a pod is kept for its handoff.
const ADDRESS_TTL: Duration = Duration::from_secs(600);
/// Most pod IPs kept (one per cold start in flight on this replica, in practice).
const MAX_ADDRESSES: usize = 10_000;
/// A claim patches with the listed `resourceVersion`, then once more after a read when only the
/// pod's status had moved.
const CLAIM_ATTEMPTS: usize = 2;

/// Fills the placeholders of a `kubernetes.pod_url` template.
pub(crate) fn expand_pod_url(
    template: &str,
    pod_ip: &str,
    pod_name: &str,
    namespace: &str,
    port: u16,
) -> String {
    // An IPv6 address goes in brackets in a URL's host.
    let ip = if pod_ip.contains(':') {
        format!("[{pod_ip}]")
    } else {
        pod_ip.to_owned()
    };
    template
        .replace("{pod_ip}", &ip)
        .replace("{pod_name}", pod_name)
        .replace("{namespace}", namespace)
        .replace("{port}", &port.to_string())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the API server answered `code`.
fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl KubernetesProvider {
    /// Keeps the IP of a pod that started, for the handoff that follows.
    pub(super) fn remember_address(&self, pod: &Pod) {
        let name = pod.metadata.name.clone();
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let (Some(name), Some(ip)) = (name, ip) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let mut addresses = lock(&self.addresses);
        addresses.retain(|_, (_, seen)| now.duration_since(*seen) < ADDRESS_TTL);
        if addresses.len() < MAX_ADDRESSES {
            addresses.insert(name, (ip, now));
        }
    }

    pub(super) fn forget_address(&self, name: &str) {
        lock(&self.addresses).remove(name);
    }

    /// The pod's IP: the listing's, or the one its start's wait saw.
    fn address_of(&self, machine: &Launched) -> Option<String> {
        machine
            .address
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| {
                lock(&self.addresses)
                    .get(&machine.handle)
                    .map(|(ip, _)| ip.clone())
            })
    }

    /// One call whose API errors the caller reads itself, bounded by the request timeout.
    async fn attempt<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, ProviderError> {
        tokio::time::timeout(self.request_timeout, fut)
            .await
            .map_err(|_| ProviderError::unavailable(NAME, format!("{what}: no answer in time")))
    }

    /// Deletes a pod with `grace` seconds for its bot after SIGTERM. `Ok(false)`: it was gone;
    /// `Err(Conflict)`: the `preconditions` did not hold.
    async fn delete_pod(
        &self,
        name: &str,
        grace: u32,
        preconditions: Option<Preconditions>,
    ) -> Result<bool, ProviderError> {
        let params = DeleteParams {
            grace_period_seconds: Some(grace),
            preconditions,
            ..DeleteParams::background()
        };
        match self
            .attempt("delete pod", self.pods.delete(name, &params))
            .await?
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) if is_status(&e, 409) => Err(ProviderError::Conflict {
                provider: NAME,
                name: name.to_owned(),
            }),
            Err(e) => Err(api_error("delete pod", e)),
        }
    }

    /// A pod draining after its handoff past `deadline` gets its grace shortened to end there.
    pub(super) async fn drain_until(
        &self,
        pod: &Pod,
        deadline: DateTime<Utc>,
    ) -> Result<(), ProviderError> {
        let ends = pod
            .metadata
            .deletion_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0));
        let Some(ends) = ends.filter(|ends| *ends > deadline) else {
            return Ok(());
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let grace = u32::try_from(pod::secs_until(deadline, Utc::now())).unwrap_or(u32::MAX);
        tracing::debug!(machine.id = %name, until = %deadline, was = %ends, "shortening the drain of a pod to its session's deadline");
        self.delete_pod(&name, grace, None).await.map(drop)
    }

    /// Whether `pod` can be claimed now: an unclaimed reserve pod of this deployment, hot,
    /// marked ready by a dispatcher, `Running` and `Ready`, not expired, not being deleted.
    fn claimable(&self, pod: &Pod) -> bool {
        let status = self.status_of(pod);
        status
            .reserve
            .as_ref()
            .is_some_and(|r| r.ready && r.tier == Tier::Hot)
            && status.provider_state == RESERVE_UP
            && pod.metadata.deletion_timestamp.is_none()
    }

    /// The claim's merge patch: the session's labels and annotations, on the version of `pod`
    /// only, and `activeDeadlineSeconds` lowered to `max_pod_secs` from now.
    fn claim_patch(
        &self,
        pod: &Pod,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> serde_json::Value {
        let mut patch = json!({
            "metadata": {
                "resourceVersion": pod.metadata.resource_version,
                "labels": labels,
            },
        });
        if !annotations.is_empty() {
            patch["metadata"]["annotations"] = json!(annotations);
        }
        let start = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0));
        if let Some(start) = start {
            let now = Utc::now();
            let backstop = now + chrono::Duration::seconds(self.settings.max_pod_secs);
            let wanted = pod::secs_until(backstop, start);
            let current = pod.spec.as_ref().and_then(|s| s.active_deadline_seconds);
            if current.is_none_or(|c| wanted < c) {
                patch["spec"] = json!({ "activeDeadlineSeconds": wanted });
            }
        }
        patch
    }
}

#[async_trait]
impl HttpHandoff for KubernetesProvider {
    fn bot_url(&self, machine: &Launched, port: u16) -> Result<url::Url, ProviderError> {
        self.check_handle(&machine.handle)?;
        let ip = self.address_of(machine);
        if ip.is_none() && self.pod_url.contains("{pod_ip}") {
            return Err(ProviderError::unavailable(
                NAME,
                format!("pod {} has no IP this replica knows of", machine.handle),
            ));
        }
        let url = expand_pod_url(
            &self.pod_url,
            ip.as_deref().unwrap_or_default(),
            &machine.handle,
            &self.namespace,
            port,
        );
        crate::config::expanded_url(NAME, "kubernetes.pod_url", &url)
    }

    /// Deletes the pod with a grace of `max_pod_secs`: SIGTERM now, and the bot finishes the
    /// session it has (see the module's notes). No lease on Kubernetes.
    async fn end_after_session(
        &self,
        handle: &str,
        _lease: Option<&str>,
    ) -> Result<(), ProviderError> {
        self.check_handle(handle)?;
        self.forget_address(handle);
        let grace = u32::try_from(self.settings.max_pod_secs).unwrap_or(u32::MAX);
        self.delete_pod(handle, grace, None).await.map(drop)
    }
}

#[async_trait]
impl Reserve for KubernetesProvider {
    fn tiers(&self) -> &'static [Tier] {
        &[Tier::Hot]
    }

    /// One create (no Secret: the pod holds no session). A taken name is another replica's
    /// pod for the same slot: [`ProviderError::Conflict`].
    async fn prepare(
        &self,
        template: &MachineTemplate,
        name: &str,
        labels: &ReserveLabels,
        env: &BTreeMap<String, String>,
    ) -> Result<Launched, ProviderError> {
        let pod = self
            .settings
            .reserve_pod(
                &self.namespace,
                template,
                name,
                labels,
                &self.deployment,
                env,
            )
            .map_err(|e| ProviderError::rejected(NAME, e))?;
        let handle = pod.metadata.name.clone().unwrap_or_default();
        match self
            .attempt("create pod", self.pods.create(&PostParams::default(), &pod))
            .await?
        {
            Ok(created) => Ok(Launched {
                handle,
                region: template.region.clone(),
                version: created.metadata.uid,
                address: None,
            }),
            Err(e) if is_status(&e, 409) => Err(ProviderError::Conflict {
                provider: NAME,
                name: handle,
            }),
            Err(e) => Err(api_error("create pod", e)),
        }
    }

    /// One list by label selector (`botdispatch.io/role=reserve`): the unclaimed reserve pods
    /// that are not being deleted. Never held ones (see the module's notes).
    async fn list_reserve(&self) -> Result<Vec<MachineStatus>, ProviderError> {
        let pods = self.list(&[(label::ROLE, ROLE_RESERVE)]).await?;
        let mut cache = std::collections::HashMap::new();
        let mut listed = Vec::new();
        for pod in pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let status = self.status_of(&pod);
            if status.reserve.is_some() {
                cache.insert(status.handle.clone(), pod);
                listed.push(status);
            }
        }
        *lock(&self.reserve_pods) = cache;
        Ok(listed)
    }

    /// One merge patch of the `botdispatch.io/ready` label.
    async fn mark_ready(&self, handle: &str) -> Result<(), ProviderError> {
        self.check_handle(handle)?;
        let labels = BTreeMap::from([(label::READY, "1")]);
        let patch = json!({ "metadata": { "labels": labels } });
        let patched = self
            .call(
                "patch pod",
                None,
                self.pods
                    .patch(handle, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        lock(&self.reserve_pods).insert(handle.to_owned(), patched);
        Ok(())
    }

    async fn suspend(&self, handle: &str) -> Result<(), ProviderError> {
        Err(ProviderError::rejected(
            NAME,
            format!("pod {handle}: Kubernetes cannot suspend a pod (hot reserves only)"),
        ))
    }

    /// One merge patch with the listed `resourceVersion` as its precondition (see the module's
    /// notes); no lease.
    async fn claim(
        &self,
        handle: &str,
        session: &SessionLabels,
    ) -> Result<Option<String>, ProviderError> {
        self.check_handle(handle)?;
        let conflict = || ProviderError::Conflict {
            provider: NAME,
            name: handle.to_owned(),
        };
        let listed = lock(&self.reserve_pods).remove(handle);
        let mut pod = match listed {
            Some(pod) => pod,
            None => self.get_pod(handle).await?.ok_or_else(conflict)?,
        };
        let mut generic = session.to_map();
        generic.insert(key::ROLE.to_owned(), ROLE_SESSION.to_owned());
        let (labels, annotations) =
            pod::to_pod_labels(&generic).map_err(|e| ProviderError::rejected(NAME, e))?;
        for attempt in 1..=CLAIM_ATTEMPTS {
            if !self.claimable(&pod) {
                return Err(conflict());
            }
            let patch = self.claim_patch(&pod, &labels, &annotations);
            let patched = self
                .attempt(
                    "patch pod",
                    self.pods
                        .patch(handle, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await?;
            match patched {
                Ok(_) => return Ok(None),
                // Changed since the listing: claimed by another replica, or only its status.
                Err(e) if is_status(&e, 409) && attempt < CLAIM_ATTEMPTS => {
                    pod = self.get_pod(handle).await?.ok_or_else(conflict)?;
                }
                Err(e) if is_status(&e, 409) || is_status(&e, 404) => return Err(conflict()),
                Err(e) => return Err(api_error("patch pod", e)),
            }
        }
        Err(conflict())
    }

    async fn start(&self, handle: &str, _lease: Option<&str>) -> Result<Launched, ProviderError> {
        Err(ProviderError::rejected(
            NAME,
            format!("pod {handle}: a hot reserve pod runs already (no stopped or suspended tier on Kubernetes)"),
        ))
    }

    /// No leases on Kubernetes ([`Reserve::claim`] returns none); the labels are set as a
    /// relabel would.
    async fn release(
        &self,
        handle: &str,
        _lease: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        if labels.is_empty() {
            return Ok(());
        }
        crate::Relabel::set_labels(self, handle, labels).await
    }

    async fn recycle(&self, handle: &str, _labels: &ReserveLabels) -> Result<(), ProviderError> {
        Err(ProviderError::rejected(
            NAME,
            format!("pod {handle}: a pod runs once (restartPolicy Never) and is never recycled"),
        ))
    }

    /// One read, then a delete with the short stop grace whose precondition is the version
    /// read: a pod claimed in between is left alone ([`ProviderError::Conflict`]).
    async fn retire(&self, handle: &str) -> Result<(), ProviderError> {
        self.check_handle(handle)?;
        lock(&self.reserve_pods).remove(handle);
        let Some(pod) = self.get_pod(handle).await? else {
            return Ok(());
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        if pod::reserve_labels(&pod, &self.deployment).is_none() {
            return Err(ProviderError::Conflict {
                provider: NAME,
                name: handle.to_owned(),
            });
        }
        let preconditions = Preconditions {
            resource_version: pod.metadata.resource_version.clone(),
            uid: pod.metadata.uid.clone(),
        };
        self.delete_pod(handle, self.stop_grace_secs, Some(preconditions))
            .await
            .map(drop)
    }
}
