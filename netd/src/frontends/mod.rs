//! Front ends for other orchestrators: thin clients of the same API that speak the
//! interfaces those orchestrators already use. They keep no state of their own; what
//! they need to find their attachments again is in the tasks' labels.

pub mod cni;
pub mod cni_queue;
pub mod docker;
