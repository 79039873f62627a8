//! SIGTERM (preemption, eviction, `kubectl delete pod`) and SIGINT only set a flag; the
//! loop checks it between steps, saves a training state and exits with the preempted
//! code, so a restarted run loses at most the step in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// Installs the handlers for SIGTERM and SIGINT.
    pub fn install() -> std::io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&flag))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&flag))?;
        Ok(Self(flag))
    }

    /// A signal that never fires (tests, library use).
    pub fn never() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
