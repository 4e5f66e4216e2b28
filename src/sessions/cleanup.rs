//! [`Created`]: what a start has created so far, and the one place that destroys it when the
//! start does not succeed — on an error, a cancellation, or the start being dropped.

use std::sync::{Arc, Mutex};

use providers::MachineProvider;
use tokio_util::task::TaskTracker;
use tracing::{warn, Instrument};

use crate::rooms::RoomService;

/// What a failed start must do about its machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Machine {
    #[default]
    Nothing,
    /// The create may or may not have happened (timeout, connection lost): look it up by key.
    Find,
    Handle(String),
}

/// Records what a start created. Unless [`Created::keep`] is called, it is destroyed: by
/// [`Created::clean_up`] on the error path (before the client gets its answer), or, if the
/// start is dropped half-way (a panic, an aborted task), in the background. Steps that run
/// concurrently record into it through a shared reference.
pub(super) struct Created {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    tasks: TaskTracker,
    key: String,
    what: Mutex<What>,
}

#[derive(Default)]
struct What {
    room: Option<String>,
    machine: Machine,
}

impl Created {
    pub(super) fn new(
        provider: Arc<dyn MachineProvider>,
        rooms: Arc<dyn RoomService>,
        tasks: TaskTracker,
        key: &str,
    ) -> Self {
        Self {
            provider,
            rooms,
            tasks,
            key: key.to_owned(),
            what: Mutex::default(),
        }
    }

    fn what(&self) -> std::sync::MutexGuard<'_, What> {
        self.what.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The room `name` exists, or may (its create failed ambiguously).
    pub(super) fn room(&self, name: &str) {
        self.what().room = Some(name.to_owned());
    }

    /// The machine was launched or claimed.
    pub(super) fn machine(&self, handle: &str) {
        self.what().machine = Machine::Handle(handle.to_owned());
    }

    /// The machine's create failed ambiguously: it may exist.
    pub(super) fn machine_maybe(&self) {
        self.what().machine = Machine::Find;
    }

    /// The machine was dealt with elsewhere (destroyed after a failed handoff).
    pub(super) fn no_machine(&self) {
        self.what().machine = Machine::Nothing;
    }

    /// The start succeeded: everything it created stays.
    pub(super) fn keep(self) {
        *self.what() = What::default();
    }

    /// Destroys what was created, room and machine concurrently. The provider and rooms
    /// clients already retry transient failures; what still fails is logged, and the reaper
    /// reconciles it (the room expires by itself regardless).
    pub(super) async fn clean_up(mut self) {
        self.take().run().await
    }

    fn take(&mut self) -> CleanUp {
        let what = std::mem::take(&mut *self.what());
        CleanUp {
            provider: Arc::clone(&self.provider),
            rooms: Arc::clone(&self.rooms),
            key: self.key.clone(),
            room: what.room,
            machine: what.machine,
        }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        let what = self.what();
        if what.room.is_none() && what.machine == Machine::Nothing {
            return;
        }
        drop(what);
        warn!("a start was dropped half-way; cleaning up in the background");
        let work = self.take();
        self.tasks.spawn(work.run().in_current_span());
    }
}

struct CleanUp {
    provider: Arc<dyn MachineProvider>,
    rooms: Arc<dyn RoomService>,
    key: String,
    room: Option<String>,
    machine: Machine,
}

impl CleanUp {
    async fn run(self) {
        let machine = async {
            let handle = match self.machine {
                Machine::Nothing => return,
                Machine::Handle(h) => h,
                Machine::Find => match self.provider.find(&self.key).await {
                    Ok(Some(m)) => m.handle,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(error = %e, "cannot look up the machine of a failed start; left for the reaper");
                        return;
                    }
                },
            };
            if let Err(e) = self.provider.terminate(&handle).await {
                warn!(machine.id = %handle, error = %e, "cannot destroy the machine of a failed start; left for the reaper");
            }
        };
        let room = async {
            if let Some(room) = &self.room {
                if let Err(e) = self.rooms.delete(room).await {
                    warn!(room, error = %e, "cannot delete the room of a failed start; it expires by itself");
                }
            }
        };
        tokio::join!(machine.in_current_span(), room.in_current_span());
    }
}
